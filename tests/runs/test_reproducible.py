"""
Seeded runs repeat to the bit on the CPU (docs/long_runs.md "Reproducible runs"): the same
`tdmpc2-moe train` command started twice, side by side in two fresh processes, writes the same
`eval.csv` and the same final parameters, plain and MoE (sparse dispatch), with one torch thread (the
two runs side by side) and with two (one after the other). Before the fix the runs parted at the first seed-phase random action
(scripts/repro_trace.py shows where two runs part).
"""
import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow  # two short trainings per case, side by side: about a minute each

# A short real run: one 500-step episode of random actions, 500 pretraining updates on it, 500 steps of
# planning with an update each, evaluations at steps 0, 500 and 1000. A small model keeps it short.
RUN = ["task=cartpole-balance", "seed=3", "steps=1000", "eval_freq=500", "seed_steps=500", "device=cpu",
	   "compile=false", "model_size=null", "mlp_dim=32", "latent_dim=16", "enc_dim=32", "num_q=2", "num_bins=11",
	   "batch_size=16", "num_samples=32", "num_elites=4", "num_pi_trajs=4", "iterations=1", "eval_episodes=1",
	   "enable_wandb=false", "save_video=false", "save_agent=true", "exp_name=repro"]
VARIANTS = {"plain": ["use_moe=false"], "moe-sparse": ["use_moe=true", "moe_dispatch=sparse", "gate_history_rows=64"]}


def _train_twice(tdmpc2_root, tmp_path, threads, keys):
	"""
	Runs the same command in two fresh processes, side by side with one thread each, one after the other
	with more (two processes of two threads on two cores would crawl); returns their work_dirs.
	"""
	env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), MUJOCO_GL="egl")
	procs, dirs = [], []
	for name in ("a", "b"):
		cwd = tmp_path / name
		cwd.mkdir()
		cmd = [sys.executable, "-m", "tdmpc2_moe", "train", "--tdmpc2", str(tdmpc2_root), *RUN, *keys]
		procs.append(subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
		dirs.append(cwd / "logs" / "cartpole-balance" / "3" / "repro")
		if threads > 1:
			_finished(procs[-1])
	for proc in procs:
		_finished(proc)
	return dirs


def _finished(proc):
	if proc.returncode is None:
		out, _ = proc.communicate(timeout=900)
		assert proc.returncode == 0, out[-3000:]


CASES = [(variant, threads, []) for variant in sorted(VARIANTS) for threads in (1, 2)]
# deterministic=true (made for CUDA runs): on the CPU too the run repeats, and run.json says it was on.
CASES.append(("moe-sparse", 1, ["deterministic=true"]))


@pytest.mark.parametrize("variant, threads, extra", CASES,
						 ids=[f"{v}-{t}thread{'s' if t > 1 else ''}{'-deterministic' if e else ''}" for v, t, e in CASES])
def test_the_same_command_twice_gives_the_same_run(tdmpc2_root, tmp_path, variant, threads, extra):
	a, b = _train_twice(tdmpc2_root, tmp_path, threads, [*VARIANTS[variant], *extra])
	for run in (a, b):
		recorded = json.loads((run / "run.json").read_text())
		assert (recorded["torch_threads"], recorded["deterministic_algorithms"]) == (threads, bool(extra))
	rows = (a / "eval.csv").read_text()
	assert rows == (b / "eval.csv").read_text()
	assert len(rows.strip().splitlines()) == 1 + 3  # header, then steps 0, 500, 1000
	model_a = torch.load(a / "models" / "final.pt", weights_only=True)["model"]
	model_b = torch.load(b / "models" / "final.pt", weights_only=True)["model"]
	assert model_a.keys() == model_b.keys()
	differ = [k for k, v in model_a.items()
			  if not (torch.equal(v, model_b[k]) if isinstance(v, torch.Tensor) else v == model_b[k])]
	assert differ == []
	assert any(k.startswith("_dynamics.router") for k in model_a) == (variant != "plain")
