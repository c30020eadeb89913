"""Every csrc/cuda/*.cu compiles with nvcc for sm_80 and sm_90 without register spills and without torch
headers; every csrc/cuda/*.cpp (the bindings) compiles against the installed torch's headers."""
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow  # builds, compiles, soaks or kills runs: minutes (pyproject.toml)

ROOT = str(REPO)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH (install the CUDA toolkit to run this check)")
def test_cuda_sources_compile_without_spills():
	result = subprocess.run(["bash", os.path.join(ROOT, "scripts", "check_nvcc.sh")], cwd=ROOT,
							env=dict(os.environ, PYTHON=sys.executable), capture_output=True, text=True)
	assert result.returncode == 0, result.stdout + result.stderr
	assert "no spills" in result.stdout
	assert "ok   csrc/cuda/binding.cpp" in result.stdout
	assert "ok   csrc/cuda/ortho_binding.cpp" in result.stdout
	assert "ok   csrc/cuda/ortho_kernels.cu (sm_90)" in result.stdout
	for arch in ("sm_80", "sm_90"):
		assert f"ok   csrc/cuda/routed_experts_kernels.cu ({arch})" in result.stdout
	assert "ok   csrc/cuda/routed_experts_binding.cpp" in result.stdout
