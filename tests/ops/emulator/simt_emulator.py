"""
Builds and loads the test-only emulated kernels: the shipped csrc/cuda/*.cu compiled for the CPU and run
on the SIMT emulator HIP-CPU (github.com/ROCm/HIP-CPU, header-only, never committed here), behind the ops
torch.ops.tdmpc2_moe_emu.* (emulated_ops.cpp). Needs $HIP_CPU_ROOT (a HIP-CPU checkout) and Intel TBB
(Debian: libtbb-dev), which HIP-CPU's parallel algorithms run on; `skip_reason()` says which is missing.
"""
import ctypes.util
import os
from pathlib import Path

HERE = Path(__file__).resolve().parent
CSRC = HERE.parents[2] / "csrc"
ENV_VAR = "HIP_CPU_ROOT"
HOW = (f"set {ENV_VAR} to a checkout of github.com/ROCm/HIP-CPU (e.g. git clone https://github.com/ROCm/HIP-CPU "
	   f"~/hip-cpu; scripts/test.sh picks up ~/hip-cpu by itself) and install TBB (apt-get install libtbb-dev)")
SOURCES = ["emulated_ops.cpp", "topk_gate_kernels.cpp", "ortho_kernels.cpp", "negative_controls.cpp"]


def hip_cpu_root():
	"""Returns the HIP-CPU checkout named by $HIP_CPU_ROOT, or None when unset or not a checkout."""
	root = os.environ.get(ENV_VAR)
	if root and (Path(root) / "include" / "hip" / "hip_runtime.h").is_file():
		return Path(root)
	return None


def skip_reason():
	"""Returns why the emulated kernels cannot be built here (None when they can)."""
	if hip_cpu_root() is None:
		where = os.environ.get(ENV_VAR)
		found = f"{ENV_VAR}={where} has no include/hip/hip_runtime.h" if where else f"{ENV_VAR} is not set"
		return f"the SIMT emulator is absent ({found}): {HOW}"
	if ctypes.util.find_library("tbb") is None or not any(
			Path(d, "tbb", "global_control.h").is_file() for d in ("/usr/include", "/usr/local/include")):
		return f"Intel TBB (library and headers) is absent, which HIP-CPU runs on: {HOW}"
	return None


def load(verbose=False):
	"""Builds (cached by torch after the first time) and loads the emulated ops; returns torch.ops.tdmpc2_moe_emu."""
	import torch
	from torch.utils.cpp_extension import load as load_extension
	# Hidden symbols: the kernels' inline functions (namespace tdmpc2_moe) must not bind to the shipped
	# extension's host-compiled copies of the same names in the same process.
	load_extension(name="tdmpc2_moe_emulated_kernels", sources=[str(HERE / s) for s in SOURCES],
				   extra_include_paths=[str(HERE / "include"), str(CSRC), str(hip_cpu_root() / "include")],
				   extra_cflags=["-O2", "-fvisibility=hidden", "-fvisibility-inlines-hidden", "-Wno-unknown-pragmas"],
				   extra_ldflags=["-ltbb"], is_python_module=False, verbose=verbose)
	return torch.ops.tdmpc2_moe_emu
