#!/usr/bin/env bash
# The learning benchmark's training runs (benchmarks/learning/README.md): one `tdmpc2-moe train -m`
# sweep per variant over tasks x seeds, with the settings of the committed results in results/, then
# `tdmpc2-moe compare` over what the sweeps wrote. Nothing here but the command lines: the sweep
# (launcher, per-job processes, progress lines, failing jobs, resume) is tdmpc2_moe/runs/sweep.py.
#
#   TDMPC2_ROOT=~/tdmpc2 bash benchmarks/learning/sweep.sh [VARIANT ...]
#
# VARIANT is plain, moe, fork or matched (default: all four, one sweep each, in that order). Runs land
# where upstream puts them, ./logs/<task>/<seed>/<variant>/ under the directory it is started from
# (eval.csv, config.yaml, run.json; gates/ for the MoE variants), Hydra's records in ./multirun/, the
# table and plots in ./compare/. Environment:
#   TASKS     tasks, comma-separated (default cartpole-balance,walker-stand)
#   SEEDS     seeds, comma-separated (default 1,2,3)
#   LAUNCHER  Hydra launcher overrides (default: joblib, two jobs at a time); on a cluster e.g.
#             "hydra/launcher=submitit_slurm hydra.launcher.partition=cpu hydra.launcher.timeout_min=120"
#   EXTRA     more overrides for every run, e.g. "checkpoint_interval=1000 resume=true" (a stopped
#             sweep started again continues each run from its last checkpoint)
#   TDMPC2_MOE  the command (default tdmpc2-moe)
# Exit status 0 when every run of every variant finished, 1 otherwise (the sweeps' summaries name them).
set -uo pipefail
: "${TDMPC2_ROOT:?set TDMPC2_ROOT to a TD-MPC2 checkout}"
TDMPC2_MOE=${TDMPC2_MOE:-tdmpc2-moe}
# One torch thread per run, as the committed runs had. Both variables: joblib gives each worker
# cores / n_jobs threads for every one of them that is unset, and torch follows MKL_NUM_THREADS too.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
# The settings every variant shares (as recorded in results/*/*/*/run.json): upstream's smallest model
# on the CPU with planning cut down, 4,000 steps, one evaluation episode every 1,000 steps.
COMMON="steps=4000 eval_freq=1000 model_size=1 device=cpu compile=false seed_steps=1000 batch_size=64
	num_samples=128 num_elites=16 num_pi_trajs=8 iterations=2 eval_episodes=1 enable_wandb=false
	save_video=false save_agent=false"

train() {
	# $COMMON, $LAUNCHER and $EXTRA are split into their overrides on purpose.
	# shellcheck disable=SC2086
	"$TDMPC2_MOE" train --tdmpc2 "$TDMPC2_ROOT" -m "task=${TASKS:-cartpole-balance,walker-stand}" \
		"seed=${SEEDS:-1,2,3}" $COMMON "$@" ${EXTRA:-} ${LAUNCHER:-hydra/launcher=joblib hydra.launcher.n_jobs=2}
}

variants=("$@")
[ ${#variants[@]} -gt 0 ] || variants=(plain moe fork matched)
for v in "${variants[@]}"; do
	case $v in plain | moe | fork | matched) ;; *) echo "sweep.sh: unknown variant $v (plain, moe, fork, matched)" >&2; exit 2 ;; esac
done
status=0
for v in "${variants[@]}"; do
	case $v in
		plain) train exp_name=plain use_moe=false ;;
		moe) train exp_name=moe use_moe=true moe_experts=4 moe_top_k=2 gate_snapshot_interval=250 ;;
		fork) train exp_name=fork moe_preset=fork use_moe=true gate_snapshot_interval=250 ;;
		matched) train exp_name=matched moe_expert_dim=192 use_moe=true moe_experts=8 moe_top_k=2 gate_snapshot_interval=250 ;;
	esac || status=1
done
"$TDMPC2_MOE" compare logs --by exp_name --at 0 1000 2000 3000 4000 --out compare || status=1
exit $status
