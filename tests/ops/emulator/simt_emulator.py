"""
Builds and loads the test-only emulated kernels: the shipped csrc/cuda/*.cu compiled for the CPU and run
on the SIMT emulator HIP-CPU (github.com/ROCm/HIP-CPU, header-only, never committed here), behind the ops
torch.ops.tdmpc2_moe_emu.* (emulated_ops.cpp). Needs $HIP_CPU_ROOT (a HIP-CPU checkout) and Intel TBB, which
HIP-CPU's parallel algorithms run on: the `tbb-devel` wheel of requirements.txt (headers in the environment's
include/, libtbb.so in its lib/), built against and loaded from there (rpath), so that no system package
is needed and the same tests run on every machine; `skip_reason()` says what is missing.
"""
import importlib.metadata
import os
from pathlib import Path

HERE = Path(__file__).resolve().parent
CSRC = HERE.parents[2] / "csrc"
ENV_VAR = "HIP_CPU_ROOT"
HOW = (f"set {ENV_VAR} to a checkout of github.com/ROCm/HIP-CPU (e.g. git clone https://github.com/ROCm/HIP-CPU "
	   f"~/hip-cpu; scripts/test.sh picks up ~/hip-cpu by itself) and install TBB's wheels "
	   "(pip install tbb-devel==2023.2.0, in requirements.txt)")
SOURCES = ["emulated_ops.cpp", "emulated_experts_ops.cpp", "topk_gate_kernels.cpp", "ortho_kernels.cpp",
		   "routed_experts_kernels.cpp", "negative_controls.cpp"]


def hip_cpu_root():
	"""Returns the HIP-CPU checkout named by $HIP_CPU_ROOT, or None when unset or not a checkout."""
	root = os.environ.get(ENV_VAR)
	if root and (Path(root) / "include" / "hip" / "hip_runtime.h").is_file():
		return Path(root)
	return None


def _wheel_file(distribution, suffix):
	"""Returns the installed file of `distribution` whose path ends with `suffix`, or None."""
	try:
		files = importlib.metadata.files(distribution) or []
	except importlib.metadata.PackageNotFoundError:
		return None
	found = next((f for f in files if f.as_posix().endswith(suffix)), None)
	return Path(found.locate()).resolve() if found is not None else None


def tbb_dirs():
	"""
	Returns (include dir, library dir) of the TBB that the tbb-devel wheel installed (its headers and the
	tbb wheel's libtbb.so land in the environment's include/ and lib/), or None when it is not installed.
	"""
	header = _wheel_file("tbb-devel", "include/tbb/global_control.h")
	library = _wheel_file("tbb", "/libtbb.so")
	if header is None or library is None or not header.is_file() or not library.is_file():
		return None
	return header.parents[1], library.parent


def skip_reason():
	"""Returns why the emulated kernels cannot be built here (None when they can)."""
	if hip_cpu_root() is None:
		where = os.environ.get(ENV_VAR)
		found = f"{ENV_VAR}={where} has no include/hip/hip_runtime.h" if where else f"{ENV_VAR} is not set"
		return f"the SIMT emulator is absent ({found}): {HOW}"
	if tbb_dirs() is None:
		return f"Intel TBB (the tbb-devel wheel: headers and libtbb.so) is not installed, which HIP-CPU runs on: {HOW}"
	return None


def load(verbose=False):
	"""Builds (cached by torch after the first time) and loads the emulated ops; returns torch.ops.tdmpc2_moe_emu."""
	import torch
	from torch.utils.cpp_extension import load as load_extension
	# Hidden symbols: the kernels' inline functions (namespace tdmpc2_moe) must not bind to the shipped
	# extension's host-compiled copies of the same names in the same process.
	tbb_include, tbb_lib = tbb_dirs()
	# TBB's headers after HIP-CPU's and the tests' own; libtbb.so found at link time by -L and at load time
	# by the rpath (the environment's lib/ is on no loader path).
	load_extension(name="tdmpc2_moe_emulated_kernels", sources=[str(HERE / s) for s in SOURCES],
				   extra_include_paths=[str(HERE / "include"), str(CSRC), str(hip_cpu_root() / "include"), str(tbb_include)],
				   extra_cflags=["-O2", "-fvisibility=hidden", "-fvisibility-inlines-hidden", "-Wno-unknown-pragmas"],
				   extra_ldflags=[f"-L{tbb_lib}", "-ltbb", f"-Wl,-rpath,{tbb_lib}"], is_python_module=False,
				   verbose=verbose)
	return torch.ops.tdmpc2_moe_emu


# Execution orders (tests/ops/emulator/include/tdmpc2_simt_emulator.h): blocks, threads (0 identity,
# 1 reversed, 2 seeded permutation), seed, sequential (one block after the other, in that order).
IDENTITY, REVERSED, SEEDED = 0, 1, 2
DEFAULT_SCHEDULE = (IDENTITY, IDENTITY, 0, False)
# The orders of the racecheck-like passes: sequential in identity, reversed and seeded block orders, with
# permuted thread orders, and concurrent (TBB threads) with permuted thread orders.
SCHEDULES = [
	(IDENTITY, IDENTITY, 0, True),
	(REVERSED, IDENTITY, 0, True),
	(SEEDED, IDENTITY, 11, True),
	(SEEDED, IDENTITY, 12345, True),
	(IDENTITY, REVERSED, 0, True),
	(SEEDED, SEEDED, 7, True),
	(REVERSED, SEEDED, 99, False),
	(SEEDED, SEEDED, 3, False),
]


def check_block_starts(schedule, starts):
	"""
	Asserts that under a sequential `schedule` the last launch's blocks (`starts`, block ids in the order
	they started) ran one after the other in the schedule's order; concurrent schedules promise no order.
	"""
	if not schedule[3]:
		return
	assert sorted(starts) == list(range(len(starts)))
	if schedule[0] == IDENTITY:
		assert starts == list(range(len(starts)))
	elif schedule[0] == REVERSED:
		assert starts == list(range(len(starts)))[::-1]


def module_marks():
	"""The `pytestmark` of a test module that runs emulated kernels: slow, skipped with the reason when
	tdmpc2_moe._C is not built or the emulator cannot be built (`skip_reason`)."""
	import pytest
	from tdmpc2_moe import backend
	return [pytest.mark.slow,
			pytest.mark.skipif(backend() == "reference", reason="tdmpc2_moe._C is not built"),
			pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")]


def emu_fixture():
	"""Returns a module-scoped pytest fixture `emu`: the loaded emulated ops (`load`), put back to the
	default schedule after the module's tests (assign it to the name `emu` in the test module)."""
	import pytest

	@pytest.fixture(scope="module")
	def emu():
		ops = load()
		yield ops
		ops.set_schedule(*DEFAULT_SCHEDULE)
	return emu
