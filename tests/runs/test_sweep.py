"""
Sweeps (`tdmpc2-moe train -m`, tdmpc2_moe/runs/sweep.py) on Hydra's joblib and submitit_local launchers,
`tdmpc2-moe compare` on their files, a failing job, a stopped sweep resumed, settings errors before
any job, and the SLURM launcher composed. Each job is a real (tiny) upstream training run on the CPU.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tdmpc2_moe.analysis import compare
from tdmpc2_moe.runs import sweep

pytestmark = pytest.mark.slow  # real training jobs: minutes
# One walker episode of random actions, then its 500 pretraining updates at batch 4; no planning.
TINY = ["task=walker-walk", "steps=510", "seed_steps=500", "eval_freq=100000", "eval_episodes=1", "enable_wandb=false",
		"compile=false", "save_video=false", "device=cpu", "model_size=1", "batch_size=4", "mpc=false",
		"monitor_mem_interval=0"]


def _train(root, cwd, *args, timeout=600, **env_vars):
	env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1", **env_vars)
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
	# On a machine without GPUs nothing is assigned; each run says where it ran.
	assert "1 torch thread per job, no GPU" in done.stdout
	run = json.loads((tmp_path / "logs" / "walker-walk" / "1" / "default-use_moe=True" / "run.json").read_text())
	assert (run["device"], run["cuda_visible_devices"], run["egl_device"], run["torch_threads"]) == ("cpu", None, None, 1)
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
	# Expert checkpoints that are not there: known only when the job builds its agent.
	done = _train(tdmpc2_root, tmp_path, *TINY, "use_moe=true", "moe_experts=2",
				  "moe_init_experts=[],[missing-a.pt,missing-b.pt]", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
	assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
	failed = done.stdout.split("failed:")[1]
	assert "1 of 2 jobs finished; failed: " in done.stdout and "moe_init_experts=[missing-a.pt,missing-b.pt]" in failed
	assert "job 0 finished" in done.stdout
	assert "missing-a.pt" in done.stdout.split("job 1 failed")[1]  # the job's own error, from its process


def test_what_a_sweep_knows_cannot_run_stops_it_before_any_job(tdmpc2_root, tmp_path):
	tiny = [a for a in TINY if not a.startswith(("task=", "seed_steps="))]
	done = _train(tdmpc2_root, tmp_path, *tiny, "seed_steps=500,100", "hydra/launcher=joblib")
	assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
	line = done.stderr.strip().splitlines()[-1]
	assert line.startswith("tdmpc2-moe train -m: job ") and "seed_steps=100 is shorter than one episode" in line
	assert "(500 steps)" in line and "seed_steps=500 or more" in line
	done = _train(tdmpc2_root, tmp_path, *tiny, "seed_steps=500", "task=walker-walk,no-such-task", "hydra/launcher=joblib")
	# A task no family has cannot run (exit 1, as the task families refuse it: docs/design.md 21), named with its job.
	line = done.stderr.strip().splitlines()[-1]
	assert done.returncode == 1 and "task=no-such-task" in line and "unknown task 'no-such-task'" in line, line
	assert not (tmp_path / "multirun").exists() and not (tmp_path / "logs").exists()


def test_joblib_jobs_see_one_gpu_each_and_one_thread_from_their_start(tdmpc2_root, tmp_path):
	# A stand-in for a node with three GPUs (sweep_gpus names them; this machine has none, the runs train
	# on the CPU): each job's process starts with its GPU, its EGL device and one thread, by job number.
	# No renderer: this machine has no EGL devices 4 to 6, and state observations need none.
	# Four combinations, three runs: the two plain ones are the same run (moe_experts changes nothing there).
	done = _train(tdmpc2_root, tmp_path, *TINY, "use_moe=false,true", "moe_experts=2,3", "sweep_gpus=[4,5,6]",
				  "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", MUJOCO_GL="disabled")
	assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
	assert "1 torch thread per job, one GPU each, round-robin over 4,5,6" in done.stdout
	assert "3 of 3 jobs finished (1 more combination the same run as another, not run twice)" in done.stdout
	runs = sorted(p.name for p in (tmp_path / "logs" / "walker-walk" / "1").iterdir())
	assert runs == ["default-moe_experts=2,use_moe=True", "default-moe_experts=3,use_moe=True", "default-use_moe=False"]
	records = [json.loads(p.read_text()) for p in (tmp_path / "multirun").glob(f"*/*/*/{sweep.JOB_FILE}")]
	assert sorted(r["status"] for r in records) == ["finished"] * 3 + ["same run"]
	for r in records:
		if r["status"] == "finished":
			run = json.loads((Path(r["work_dir"]) / "run.json").read_text())
			gpu = "456"[r["num"] % 3]
			assert (run["cuda_visible_devices"], run["egl_device"], run["torch_threads"], run["device"]) == (gpu, gpu, 1, "cpu")
			assert r["environment"]["CUDA_VISIBLE_DEVICES"] == gpu


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


def test_ray_sweep_packs_jobs_by_their_resources_then_compare(tdmpc2_root, tmp_path):
	pytest.importorskip("hydra_plugins.hydra_ray_launcher", reason="hydra-ray-launcher is not installed (pip install .[sweep])")
	# A local Ray of 2 CPUs, each job asking for one: Ray never runs more than two at once (the same
	# accounting packs 8 jobs on a GPU with hydra.launcher.ray.remote.num_gpus=0.125).
	done = _train(tdmpc2_root, tmp_path, *TINY, "seed=1,2", "use_moe=true,false", "moe_experts=2", "hydra/launcher=ray",
				  "hydra.launcher.ray.init.num_cpus=2", "hydra.launcher.ray.init.include_dashboard=false",
				  "hydra.launcher.ray.remote.num_cpus=1", timeout=1200)
	assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
	assert "4 jobs on RayLauncher" in done.stdout and "4 of 4 jobs finished" in done.stdout
	assert "GPUs as Ray assigns them" in done.stdout
	records = [json.loads(p.read_text()) for p in (tmp_path / "multirun").glob(f"*/*/*/{sweep.JOB_FILE}")]
	assert len(records) == 4 and all(r["ray_resources"] == {"CPU": 1.0} for r in records)
	events = sorted([(r["started"], 1) for r in records] + [(r["ended"], -1) for r in records], key=lambda e: (e[0], e[1]))
	running = most = 0
	for _, change in events:
		running += change
		most = max(most, running)
	assert 1 <= most <= 2
	runs, skipped = compare.read_runs([tmp_path / "logs"])
	assert len(runs) == 4 and not skipped
