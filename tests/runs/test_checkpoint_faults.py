"""
Fault tests of checkpoint/resume: real `tdmpc2-moe train` processes of upstream TD-MPC2 on the CPU,
killed with SIGKILL at random moments (during a checkpoint write, during updates, anywhere) and
resumed with resume=true. Needs $TDMPC2_ROOT. Each test prints where its kills landed (pytest -s).

The runs are tiny (about a minute of CPU time for the file): model_size=1 with 2 experts, horizon 1,
batch 4, 700 steps with a checkpoint at the first episode end (step 500); seed_steps=0, so that
updates start at the first stored episode (step 500) instead of upstream's 500-update burst.
"""
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from tdmpc2_moe.runs import checkpoint

pytestmark = pytest.mark.slow  # builds, compiles, soaks or kills runs: minutes (pyproject.toml)

ARGS = ["task=walker-walk", "steps=700", "seed_steps=0", "eval_freq=100000", "eval_episodes=1", "enable_wandb=false",
		"compile=false", "save_video=false", "device=cpu", "model_size=1", "batch_size=4", "num_q=2", "horizon=1",
		"mpc=false", "use_moe=true", "moe_experts=2", "monitor_mem_interval=0", "checkpoint_interval=500"]
TIMEOUT = 300
WORK = ("logs", "walker-walk", "1", "default")


class _Run:
	"""One `tdmpc2-moe train` process in `cwd` (unbuffered output appended to cwd/train.log)."""

	def __init__(self, root, cwd, *extra):
		env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
		self.log = cwd / "train.log"
		self.offset = self.log.stat().st_size if self.log.exists() else 0
		with open(self.log, "a") as out:
			self.proc = subprocess.Popen(
				[sys.executable, "-m", "tdmpc2_moe", "train", "--tdmpc2", str(root), *ARGS, *extra],
				cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env)

	def output(self):
		"""Returns what this process has written so far."""
		with open(self.log) as f:
			f.seek(self.offset)
			return f.read()

	def finish(self):
		"""Waits for the process; returns its output, failing the test on a timeout or an error exit."""
		try:
			code = self.proc.wait(timeout=TIMEOUT)
		except subprocess.TimeoutExpired:
			self.proc.kill()
			pytest.fail(f"training process did not finish within {TIMEOUT} s")
		assert code == 0, self.output()[-3000:]
		return self.output()

	def kill(self, path, mode, rng):
		"""
		SIGKILLs the process: "write" as soon as its checkpoint temporary file appears; "update" at a
		random moment once it stands at the step-500 checkpoint (written or resumed from: updates run
		from there); "any" at a random time after the start. Returns where the kill landed, as observed.
		"""
		proc, start = self.proc, time.monotonic()
		when = start + rng.uniform(1.0, 30.0) if mode == "any" else None
		while proc.poll() is None and time.monotonic() - start < TIMEOUT:
			if mode == "write" and (_temporaries(path, proc.pid) or path.exists()):
				break
			if mode == "update" and ("Checkpoint at step 500" in self.output() or "Resumed from" in self.output()):
				time.sleep(rng.uniform(0.0, 3.0))
				break
			if when is not None and time.monotonic() >= when:
				break
			time.sleep(0.0002 if mode == "write" else 0.01)
		if proc.poll() is not None:
			return "after the run had ended"
		proc.send_signal(signal.SIGKILL)
		proc.wait(timeout=60)
		out = self.output()
		if _temporaries(path, proc.pid):
			return "during the checkpoint write"
		if "Checkpoint at step 500" in out or "Resumed from" in out:
			return "during the updates after step 500"
		if "Architecture:" in out:
			return "in the seed phase (steps 0-500)"
		return "during start-up"


def _paths(cwd):
	work = cwd.joinpath(*WORK)
	return work, checkpoint.checkpoint_path(work)


def _temporaries(path, pid="*"):
	"""Returns the temporary files of writers of `path` (of process `pid` only, when given)."""
	return list(path.parent.glob(f".{path.name}.tmp-{pid}")) if path.parent.is_dir() else []


def _model(path):
	state = torch.load(path, map_location="cpu", weights_only=True)
	return {k: v for k, v in state["model"].items() if torch.is_tensor(v)}


def _check_loadable(path):
	"""The checkpoint, when there is one, loads and stands at the step-500 episode end."""
	if path.exists():
		state = checkpoint.load(path)
		assert state["step"] == 500 and state["episode"] == 1


@pytest.fixture(scope="module")
def reference(tdmpc2_root, tmp_path_factory):
	"""An uninterrupted run with checkpoint_buffer=true: returns its work directory."""
	cwd = tmp_path_factory.mktemp("uninterrupted")
	_Run(tdmpc2_root, cwd, "checkpoint_buffer=true").finish()
	return _paths(cwd)[0]


def test_killed_and_resumed_run_equals_the_uninterrupted_run(tdmpc2_root, reference, tmp_path):
	rng = random.Random()
	work, path = _paths(tmp_path)
	landed = []
	for i, mode in enumerate(("write", "any", "update")):
		run = _Run(tdmpc2_root, tmp_path, "checkpoint_buffer=true", *(["resume=true"] if i else []))
		landed.append(f"{mode}: {run.kill(path, mode, rng)}")
		_check_loadable(path)
	out = _Run(tdmpc2_root, tmp_path, "checkpoint_buffer=true", "resume=true").finish()
	print("\nkills:", "; ".join(landed))
	assert "Training completed successfully" in out and "Traceback" not in out
	if path.exists():
		assert "at step 500, episode 1 (with replay buffer)" in out
	_check_loadable(path)
	assert _temporaries(path) == []  # a killed writer's temporary file is removed on resume
	# The resumed run's updates (500..700) are the uninterrupted run's, bit for bit: same model at the end.
	want, got = _model(reference / "models" / "final.pt"), _model(work / "models" / "final.pt")
	assert want.keys() == got.keys()
	for key in want:
		assert torch.equal(want[key], got[key]), key
	assert (work / "eval.csv").read_text() == (reference / "eval.csv").read_text()


def test_resumed_model_gives_finite_losses(walker_cfg, reference):
	from common.buffer import Buffer
	from tdmpc2 import TDMPC2
	cfg = walker_cfg(*[a for a in ARGS if a.split("=")[0] in ("batch_size", "num_q", "horizon", "mpc", "use_moe",
																"moe_experts")])
	agent, buffer = TDMPC2(cfg), Buffer(cfg)
	agent.load(str(reference / "models" / "final.pt"))
	checkpoint.restore_buffer(buffer, checkpoint.load(checkpoint.checkpoint_path(reference))["buffer"])
	info = agent.update(buffer)
	assert all(torch.isfinite(v).all() for v in info.values()), info


def test_resume_without_buffer_continues_the_step_counter(tdmpc2_root, reference, tmp_path):
	# The uninterrupted run's step-500 checkpoint without its buffer (as checkpoint_buffer=false writes
	# it). The buffer restarts empty: the resumed episode collects data with the restored agent and
	# runs no update before it is stored (step 1000, after this run's end), and the counters go on.
	work, path = _paths(tmp_path)
	saved = checkpoint.load(checkpoint.checkpoint_path(reference))
	saved["buffer"] = None
	checkpoint.atomic_save(saved, path)
	out = _Run(tdmpc2_root, tmp_path, "resume=true").finish()
	assert "at step 500, episode 1 (without replay buffer)" in out and "Training completed successfully" in out
	final = _model(work / "models" / "final.pt")
	for key, value in final.items():
		assert torch.isfinite(value).all() and torch.equal(value, saved["agent"]["model"][key]), key


def test_corrupted_checkpoint_is_one_line_naming_it(tdmpc2_root, tmp_path):
	work, path = _paths(tmp_path)
	checkpoint.atomic_save({"step": 500}, path)
	path.write_bytes(path.read_bytes()[:300])
	env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
	out = subprocess.run([sys.executable, "-m", "tdmpc2_moe", "train", "--tdmpc2", str(tdmpc2_root), *ARGS,
						  "resume=true"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=TIMEOUT)
	assert out.returncode == 1
	errors = [line for line in out.stderr.splitlines() if line.startswith("tdmpc2-moe train:")]
	assert len(errors) == 1 and str(path) in errors[0] and "truncated or corrupted" in errors[0]
	assert "Traceback" not in out.stderr + out.stdout


# A separate interpreter, not a fork: forking a process whose torch thread pools already run can
# deadlock the child (it never writes, and the test waits for nothing).
_REWRITE_FOREVER = ("import sys, torch\n"
					"from tdmpc2_moe import checkpoint\n"
					"for i in range(1000):\n"
					"	checkpoint.atomic_save({'step': i, 'weights': torch.full((4_000_000,), float(i))}, sys.argv[1])\n")


def test_kill_during_a_write_keeps_the_previous_checkpoint(tmp_path):
	# No upstream needed: a process rewriting a 16 MB checkpoint in a loop, killed while its
	# temporary file is being written; the checkpoint is always a complete earlier version.
	rng, path, landed = random.Random(), tmp_path / "latest.pt", []
	for _ in range(5):
		proc = subprocess.Popen([sys.executable, "-c", _REWRITE_FOREVER, str(path)],
								env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
		deadline = time.monotonic() + TIMEOUT
		while not (path.exists() and _temporaries(path, proc.pid)) and time.monotonic() < deadline:
			assert proc.poll() is None, "the rewriting process ended before it was killed"
			time.sleep(0.0002)
		time.sleep(rng.uniform(0.0, 0.02))
		os.kill(proc.pid, signal.SIGKILL)
		proc.wait(timeout=60)
		landed.append(bool(_temporaries(path, proc.pid)))
		state = checkpoint.load(path)
		assert torch.equal(state["weights"], torch.full((4_000_000,), float(state["step"])))
		checkpoint.remove_stale_temporaries(path)
	print(f"\n{sum(landed)} of {len(landed)} kills landed while a temporary file was being written")
	assert any(landed)
