"""
Sweeps (`tdmpc2-moe train -m`, tdmpc2_moe/runs/sweep.py) on Hydra's joblib and submitit_local launchers,
`tdmpc2-moe compare` on their files, a failing job, a stopped sweep resumed, settings errors before
any job, and the SLURM launcher composed. Each job is a real (tiny) upstream training run on the CPU.
"""
import os
import subprocess
import sys

import pytest

from tdmpc2_moe.analysis import compare
from tdmpc2_moe.runs import sweep

pytestmark = pytest.mark.slow  # real training jobs: minutes
# One walker episode of random actions, then its 500 pretraining updates at batch 4; no planning.
TINY = ["task=walker-walk", "steps=510", "seed_steps=500", "eval_freq=100000", "eval_episodes=1", "enable_wandb=false",
		"compile=false", "save_video=false", "device=cpu", "model_size=1", "batch_size=4", "mpc=false",
		"monitor_mem_interval=0"]


def _train(root, cwd, *args, timeout=600):
	env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
	return subprocess.run([sys.executable, "-m", "tdmpc2_moe", "train", "--tdmpc2", str(root), "-m", *args], cwd=cwd,
						  capture_output=True, text=True, env=env, timeout=timeout)


def test_joblib_sweep_then_compare_then_resume(tdmpc2_root, tmp_path):
	args = [*TINY, "seed=1,2", "use_moe=true,false", "moe_experts=2", "checkpoint_interval=500",
			"hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
	done = _train(tdmpc2_root, tmp_path, *args)
	assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
	assert "tdmpc2-moe sweep: 4 jobs on JoblibLauncher" in done.stdout
	assert "tdmpc2-moe sweep: 4 of 4 jobs finished" in done.stdout
	assert done.stderr.count("finished, return") == 4  # one progress line per finished job
	runs = sorted(p.name for p in (tmp_path / "logs" / "walker-walk" / "1").iterdir())
	assert runs == ["default-use_moe=False", "default-use_moe=True"]
	# compare reproduces the sweep's table and plot from the files alone
	lines = compare.compare([tmp_path / "logs"], tmp_path / "cmp")
	assert lines[0] == f"read 4 runs under {tmp_path / 'logs'}; variants by use_moe"
	table = (tmp_path / "cmp" / "compare.md").read_text()
	assert "| use_moe=False | 2 |" in table and "| use_moe=True | 2 |" in table
	assert (tmp_path / "cmp" / "walker-walk.png").read_bytes()[:4] == b"\x89PNG"
	# the same sweep again with resume=true: every job continues from its own checkpoint
	again = _train(tdmpc2_root, tmp_path, *args, "resume=true")
	assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
	assert again.stdout.count("Resumed from") == 4 or again.stderr.count("Resumed from") == 4 \
		or (again.stdout + again.stderr).count("Resumed from") == 4, again.stdout[-3000:]


def test_submitit_local_sweep(tdmpc2_root, tmp_path):
	done = _train(tdmpc2_root, tmp_path, *TINY, "seed=1,2", "use_moe=true,false", "moe_experts=2",
				  "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=20")
	assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
	assert "4 jobs on LocalLauncher" in done.stdout and "4 of 4 jobs finished" in done.stdout
	runs, skipped = compare.read_runs([tmp_path / "logs"])
	assert len(runs) == 4 and not skipped


def test_a_failing_job_is_named_and_the_others_finish(tdmpc2_root, tmp_path):
	tiny = [a for a in TINY if not a.startswith("task=")]
	done = _train(tdmpc2_root, tmp_path, *tiny, "task=walker-walk,no-such-task", "use_moe=false",
				  "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
	assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
	assert "1 of 2 jobs finished; failed: " in done.stdout and "task=no-such-task" in done.stdout.split("failed:")[1]
	assert "job 0 finished" in done.stdout


def test_settings_errors_stop_the_sweep_before_any_job(tdmpc2_root, tmp_path):
	done = _train(tdmpc2_root, tmp_path, *TINY, "use_moe=true", "moe_heads=[pi],[Qs]", "hydra/launcher=joblib")
	assert done.returncode == 2
	assert "tdmpc2-moe train -m: job " in done.stderr and "moe_heads=[Qs]" in done.stderr and "Qs" in done.stderr
	assert not (tmp_path / "multirun").exists() and not (tmp_path / "logs").exists()


def test_slurm_launcher_composes(tdmpc2_root):
	launcher = sweep.compose_launcher(["hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu",
									   "hydra.launcher.gpus_per_node=1"], tdmpc2_root)
	assert launcher._target_.endswith("SlurmLauncher")
	assert launcher.partition == "gpu" and launcher.gpus_per_node == 1
