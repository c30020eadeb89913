"""scripts/gpu_check.sh --dry-run: every step of the GPU check has its inputs (tests and benchmarks that
collect, a workload that runs on the CPU, the build's sources) and the script reports each step."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ["build", "backend", "self_check", "tests", "cuda_graph", "sanitizer_memcheck", "sanitizer_racecheck", "sanitizer_synccheck",
		 "bench_gating"]


@pytest.mark.slow
def test_dry_run_checks_every_step(tmp_path):
	env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
	result = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), "--dry-run"], cwd=ROOT, env=env,
							capture_output=True, text=True, timeout=600)
	summary = (tmp_path / "summary.txt").read_text()
	assert result.returncode == 0, summary + result.stderr
	for step in STEPS:
		assert f"ok    {step} " in summary, (step, summary)
	# The training steps need a TD-MPC2 checkout and upstream's packages: checked, or skipped saying so.
	for step in ("packed_sweep", "deterministic_runs"):
		assert f"ok    {step} " in summary or f"SKIP  {step}: needs TDMPC2_ROOT" in summary, (step, summary)
	# Every command the real run would execute is named, with the pieces the GPU run relies on.
	logs = "".join((tmp_path / f).read_text() for f in ("build.log", "tests.log", "sanitizer.log", "bench.log"))
	for piece in ("build_ext --inplace", "TDMPC2_MOE_CUDA=1", "test_cuda.py", "compute-sanitizer --tool memcheck",
				  "compute-sanitizer --tool racecheck", "TDMPC2_MOE_BENCH_DEVICE=cuda", "--benchmark-json="):
		assert piece in logs, piece
	assert "workload done" in logs  # the sanitizers' workload ran on the CPU
	assert len(os.listdir(tmp_path)) <= 8  # what the device tool brings back from $OUT


def test_dry_run_fails_when_a_step_lacks_its_inputs(tmp_path):
	# A broken step is reported, not papered over: point PYTHON at an interpreter that fails.
	env = dict(os.environ, OUT=str(tmp_path), PYTHON="false")
	result = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), "--dry-run"], cwd=ROOT, env=env,
							capture_output=True, text=True, timeout=600)
	assert result.returncode != 0
	assert "FAIL  backend" in (tmp_path / "summary.txt").read_text()
