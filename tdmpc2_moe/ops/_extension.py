"""
Where the compiled operators (`tdmpc2_moe._C`) come from.

- Built ahead of time (`pip install --no-build-isolation .`, torch importable at build time):
  `_C` sits in the package and is imported.
- Installed as typed (`pip install .`: pip's isolated build environment has no torch, so nothing is
  compiled then): the package carries the C++ sources in `_csrc/` and the extension is compiled on
  first import with `torch.utils.cpp_extension.load` (ninja), into a cache directory keyed by the
  sources, the flags and the torch version, so later imports load it at once.
- No compiler, no ninja or a failed build: `load_compiled()` says why, and `operators.py` falls back to the
  plain-PyTorch reference with one warning.

Nothing here imports torch at module level: setup.py loads this file (by path) for the source list
and flags, where torch may not be importable.
"""
import hashlib
import importlib.util
import os
import shutil
import sys
from pathlib import Path

# -fno-trapping-math lets gcc if-convert and vectorise the branch-free exp of gate_row.h.
# -fno-wrapv undoes Python's -fwrapv: with wrapping int indices gcc cannot vectorise the lane loops.
CXX_FLAGS = ["-O3", "-fno-trapping-math", "-fno-wrapv"]
NVCC_FLAGS = ["-O3"]
CUDA_DEFINE = "-DTDMPC2_MOE_WITH_CUDA=1"
# The C++ sources inside an installed package (copied there by setup.py's build_py).
PACKAGED_SOURCES = Path(__file__).resolve().parents[1] / "_csrc"
CACHE_ENV = "TDMPC2_MOE_BUILD_DIR"


def source_files(csrc, cuda):
	"""Returns the sources of the extension under `csrc` (the csrc/ directory): C++ always, CUDA ones when `cuda`."""
	csrc = Path(csrc)
	files = sorted(csrc.glob("*.cpp")) + sorted((csrc / "cpu").glob("*.cpp"))
	if cuda:
		files += sorted((csrc / "cuda").glob("*.cu")) + sorted((csrc / "cuda").glob("*.cpp"))
	return files


def want_cuda(torch_version_cuda, cuda_home):
	"""Returns whether to build the CUDA kernels: TDMPC2_MOE_CUDA=0/1 decides, else torch has CUDA and nvcc is found."""
	forced = os.environ.get("TDMPC2_MOE_CUDA")
	if forced is not None:
		return forced == "1"
	return torch_version_cuda is not None and cuda_home is not None


def compile_args(cuda):
	"""Returns (cxx flags, nvcc flags) for a build with or without the CUDA kernels."""
	if cuda:
		return CXX_FLAGS + [CUDA_DEFINE], NVCC_FLAGS + [CUDA_DEFINE]
	return list(CXX_FLAGS), []


def _cache_dir(cuda, torch_version):
	digest = hashlib.sha256()
	for part in (torch_version, str(cuda), sys.version, *CXX_FLAGS, *NVCC_FLAGS):
		digest.update(part.encode())
	for path in sorted(PACKAGED_SOURCES.rglob("*")):
		if path.is_file():
			digest.update(str(path.relative_to(PACKAGED_SOURCES)).encode())
			digest.update(path.read_bytes())
	base = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "tdmpc2_moe")
	return Path(base) / f"torch{torch_version}-{'cuda' if cuda else 'cpu'}-{digest.hexdigest()[:16]}"


def _import_built(path):
	spec = importlib.util.spec_from_file_location("tdmpc2_moe._C", path)
	module = importlib.util.module_from_spec(spec)
	spec.loader.exec_module(module)
	sys.modules["tdmpc2_moe._C"] = module
	return module


def _compile_on_import():
	"""Returns (module, None) after building (or finding cached) `_C` from `_csrc/`, or (None, reason)."""
	import torch
	from torch.utils import cpp_extension
	cuda = want_cuda(torch.version.cuda, cpp_extension.CUDA_HOME)
	sources = source_files(PACKAGED_SOURCES, cuda)
	build_dir = _cache_dir(cuda, torch.__version__)
	built = next(iter(sorted(build_dir.glob("_C*.so"))), None) if build_dir.is_dir() else None
	if built is not None:
		return _import_built(built), None
	compiler = os.environ.get("CXX", "c++")
	if shutil.which(compiler) is None:
		return None, f"no C++ compiler ({compiler!r} is not on PATH) to build it from the packaged sources"
	if not cpp_extension.is_ninja_available():
		return None, "ninja is not installed (`pip install ninja`) to build it from the packaged sources"
	build_dir.mkdir(parents=True, exist_ok=True)
	print(f"tdmpc2_moe: compiling the C++ extension on first import (once; cached in {build_dir}) ...",
		  file=sys.stderr, flush=True)
	cxx, nvcc = compile_args(cuda)
	try:
		cpp_extension.load("_C", [str(s) for s in sources], extra_cflags=cxx, extra_cuda_cflags=nvcc or None,
						   build_directory=str(build_dir), with_cuda=cuda, verbose=False)
	except Exception as exc:  # a compiler error, a missing header: report it, fall back to the reference
		lines = str(exc).strip().splitlines()
		return None, f"compiling it in {build_dir} failed ({lines[-1] if lines else type(exc).__name__})"
	return _import_built(next(iter(sorted(build_dir.glob("_C*.so"))))), None


def load_compiled():
	"""
	Returns (module, None) when the compiled extension is available -- built ahead of time, cached,
	or compiled now from the packaged sources -- or (None, reason) when the reference must be used.
	"""
	try:
		from .. import _C
		return _C, None
	except ImportError as exc:
		prebuilt_error = exc
	if not PACKAGED_SOURCES.is_dir():
		return None, f"tdmpc2_moe._C is not built ({prebuilt_error})"
	return _compile_on_import()
