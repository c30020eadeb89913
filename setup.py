"""
Builds tdmpc2_moe. Two ways, both from `pip install`:
- `pip install --no-build-isolation .`: torch is importable, so `_C` is compiled now against it
  (CppExtension on a CPU-only torch, CUDAExtension when torch has CUDA and nvcc is found;
  TDMPC2_MOE_CUDA=0/1 forces the choice).
- `pip install .` (build isolation: no torch in pip's build environment): nothing is compiled; the
  package carries csrc/ as `_csrc/` and compiles it on first import (see tdmpc2_moe/ops/_extension.py).
Either way the sources ship inside the package, so an installed copy can rebuild itself if the
prebuilt `_C` does not load against the torch it meets.
"""
import importlib.util
import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("tdmpc2_moe_extension", ROOT / "tdmpc2_moe" / "ops" / "_extension.py")
extension = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(extension)


class BuildPyWithSources(build_py):
	"""build_py that starts from an empty built package and copies csrc/ into it as `_csrc/`."""

	def run(self):
		# build_py only adds files to build/lib: a build/ left in the tree by an older checkout still
		# holds modules moved or deleted since (the flat modules before the folder layout), and the
		# wheel would ship them. Runs before build_ext, so the extension it compiles is kept.
		shutil.rmtree(Path(self.build_lib) / "tdmpc2_moe", ignore_errors=True)
		super().run()
		shutil.copytree(ROOT / "csrc", Path(self.build_lib) / "tdmpc2_moe" / "_csrc", dirs_exist_ok=True)


def build_options():
	"""Returns the `ext_modules` and `cmdclass` entries of setup(): `_C` when torch is importable, none otherwise."""
	cmdclass = {"build_py": BuildPyWithSources}
	try:
		import torch
		from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
	except ImportError:
		print("tdmpc2_moe: torch is not importable in this build environment (pip's build isolation): "
			  "the C++ extension will be compiled on first import instead")
		return [], cmdclass
	cuda = extension.want_cuda(torch.version.cuda, CUDA_HOME)
	sources = [str(p.relative_to(ROOT)) for p in extension.source_files(ROOT / "csrc", cuda)]
	cxx, nvcc = extension.compile_args(cuda)
	args = {"cxx": cxx, "nvcc": nvcc} if cuda else {"cxx": cxx}
	ext = CUDAExtension if cuda else CppExtension
	cmdclass["build_ext"] = BuildExtension
	return [ext("tdmpc2_moe._C", sources, extra_compile_args=args)], cmdclass


ext_modules, cmdclass = build_options()
setup(
	name="tdmpc2_moe",
	version="0.2.0",
	description="Mixture-of-Experts world-model heads for TD-MPC2 with a fused top-k gating operator",
	packages=find_packages(include=["tdmpc2_moe", "tdmpc2_moe.*"]),
	python_requires=">=3.9",
	# torch is deliberately absent: the build uses the torch already installed, and listing it
	# could make pip replace it (e.g. pull a multi-GB CUDA build into a CPU environment).
	install_requires=["numpy", "psutil", "matplotlib", "tqdm", "ninja"],
	# `pip install .[sweep]`: Hydra's launchers for `tdmpc2-moe train -m` (upstream's default is submitit_local;
	# joblib below 1.6 beside hydra-ray-launcher, which needs cloudpickle<3). `.[wandb]`: enable_wandb=true.
	extras_require={"sweep": ["hydra-joblib-launcher>=1.2", "hydra-submitit-launcher>=1.2", "hydra-ray-launcher>=1.2.2",
							  "joblib<1.6"],
					"wandb": ["wandb"]},
	ext_modules=ext_modules,
	cmdclass=cmdclass,
	entry_points={"console_scripts": ["tdmpc2-moe = tdmpc2_moe.cli:main"]},
)
