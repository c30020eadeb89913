"""
Files written by the package before its modules moved into folders (docs/architecture.md) still work:
the agent checkpoint plays and starts a training run, and the run checkpoint resumes. Both come from
one tiny real run of the code at commit 4ca19d6, the last before the move
(tests/data/agent_before_layout.pt is its models/final.pt, tests/data/run_checkpoint_before_layout.pt
its checkpoints/latest.pt, written at the run's last episode end, step 1000), made with `OMP_NUM_THREADS=1 tdmpc2-moe train --tdmpc2
~/tdmpc2` and the keys of RUN below plus `steps=1000 eval_freq=1000 exp_name=premove save_agent=true
checkpoint_interval=500`.
"""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import DATA
from tdmpc2_moe.analysis import gate_stats
from tdmpc2_moe.cli import main as cli_main

AGENT = DATA / "agent_before_layout.pt"
RUN_CHECKPOINT = DATA / "run_checkpoint_before_layout.pt"
# The run's model and settings (a small model keeps the files small and the runs short).
MODEL = ["task=cartpole-balance", "model_size=null", "mlp_dim=32", "latent_dim=16", "enc_dim=32", "num_q=2",
		 "num_bins=11", "use_moe=true", "moe_experts=4", "moe_top_k=2", "gate_history_rows=64"]
RUN = [*MODEL, "seed=1", "device=cpu", "compile=false", "seed_steps=500", "batch_size=16", "num_samples=32",
	   "num_elites=4", "num_pi_trajs=4", "iterations=1", "eval_episodes=1", "enable_wandb=false", "save_video=false"]


def test_the_agent_checkpoint_loads_with_its_moe_settings():
	saved = torch.load(AGENT, weights_only=True)
	assert saved["moe"]["use_moe"] is True and saved["moe"]["moe_experts"] == 4
	assert any(k.startswith("_dynamics.router.gate") for k in saved["model"])


def test_the_agent_checkpoint_plays(tdmpc2_root, tmp_path, unpatched):
	out = tmp_path / "play"
	code = cli_main(["play", "--tdmpc2", str(tdmpc2_root), "--checkpoint", str(AGENT), "--num-steps", "20",
					 "--seed", "1", "--device", "cpu", "--out", str(out), *MODEL, "num_samples=32", "num_elites=4",
					 "num_pi_trajs=4", "iterations=1"])
	assert code == 0
	per_head, lengths, _ = gate_stats.load_weight_stats(str(out / "weight_stats.npz"))
	assert list(per_head) == ["dynamics", "reward", "pi"] and lengths.tolist() == [20]
	for arrays in per_head.values():
		np.testing.assert_allclose(arrays["weights"].sum(-1), 1.0, atol=1e-5)


def _train(root, cwd, *keys):
	env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
	done = subprocess.run([sys.executable, "-m", "tdmpc2_moe", "train", "--tdmpc2", str(root), *RUN, *keys],
						  cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
	assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
	return done.stdout


@pytest.mark.slow  # a short training run
def test_the_run_checkpoint_resumes(tdmpc2_root, tmp_path):
	work = tmp_path / "logs" / "cartpole-balance" / "1" / "premove"
	(work / "checkpoints").mkdir(parents=True)
	shutil.copy(RUN_CHECKPOINT, work / "checkpoints" / "latest.pt")
	# The saved run ended at step 1000 (evaluated at 0 and 1000); resumed with more steps, it goes on.
	out = _train(tdmpc2_root, tmp_path, "steps=1500", "eval_freq=500", "exp_name=premove", "checkpoint_interval=500",
				 "resume=true")
	assert "Resumed from" in out and "at step 1,000, episode 2" in out
	rows = (work / "eval.csv").read_text().strip().splitlines()
	assert rows[0] == "step,episode_reward" and [float(r.split(",")[0]) for r in rows[1:]] == [0, 1000, 1500]


@pytest.mark.slow  # a short training run
def test_the_agent_checkpoint_starts_a_training_run(tdmpc2_root, tmp_path):
	out = _train(tdmpc2_root, tmp_path, "steps=500", "eval_freq=500", "exp_name=from_checkpoint", f"checkpoint={AGENT}")
	assert f"starting from the model in checkpoint={AGENT}" in out
