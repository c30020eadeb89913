"""
The learning benchmark's variants and the settings its training runs share, as `key=value` overrides
of `tdmpc2-moe train`: what `measure.py` times, what `wm_fit.py` and `mt_fit.py` fit, and what
`sweep.sh` trains. `sweep.sh` spells the same keys out as command lines (a reader copies them from
there); tests/test_learning.py checks that the two agree with each other and with the settings
recorded next to every committed run in `results/`.
"""

# Upstream's smallest model on the CPU with reduced planning, so that the plain agent learns
# cartpole-balance within a few thousand steps on a 2-core machine.
COMMON = ["model_size=1", "device=cpu", "compile=false", "seed_steps=1000", "batch_size=64",
		  "num_samples=128", "num_elites=16", "num_pi_trajs=8", "iterations=2", "eval_episodes=1",
		  "enable_wandb=false", "save_video=false", "save_agent=false"]
# Routing snapshots (work_dir/gates/step_<update>.npz) every this many updates in the MoE variants.
GATE_SNAPSHOT_EVERY = 250
# What differs between variants; the first key of each is the setting a variant needs to exist.
VARIANTS = {
	"plain": ["use_moe=false"],
	"moe": ["use_moe=true", "moe_experts=4", "moe_top_k=2", f"gate_snapshot_interval={GATE_SNAPSHOT_EVERY}"],
	"fork": ["moe_preset=fork", "use_moe=true", f"gate_snapshot_interval={GATE_SNAPSHOT_EVERY}"],
	# Compute-matched (docs/design.md 16): 8 experts of half the width (mlp_dim 384 at model_size=1), top-2.
	"matched": ["moe_expert_dim=192", "use_moe=true", "moe_experts=8", "moe_top_k=2",
				f"gate_snapshot_interval={GATE_SNAPSHOT_EVERY}"],
}

