"""Builds tdmpc2_moe._C against the torch already installed (use `pip install --no-build-isolation .`).

CppExtension on a CPU-only torch; CUDAExtension when torch has CUDA and nvcc is found.
TDMPC2_MOE_CUDA=0/1 forces the choice.
"""
import glob
import os

from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
import torch


def use_cuda():
	forced = os.environ.get("TDMPC2_MOE_CUDA")
	if forced is not None:
		return forced == "1"
	return torch.version.cuda is not None and CUDA_HOME is not None


def extensions():
	cuda = use_cuda()
	sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
	# -fno-trapping-math lets gcc if-convert and vectorise the branch-free exp of gate_row.h.
	# -fno-wrapv undoes Python's -fwrapv: with wrapping int indices gcc cannot vectorise the lane loops.
	cxx = ["-O3", "-fno-trapping-math", "-fno-wrapv"]
	args = {"cxx": cxx}
	if cuda:
		sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
		cxx.append("-DTDMPC2_MOE_WITH_CUDA=1")
		args["nvcc"] = ["-O3", "-DTDMPC2_MOE_WITH_CUDA=1"]
	ext = CUDAExtension if cuda else CppExtension
	return [ext("tdmpc2_moe._C", sources, extra_compile_args=args)]


setup(
	name="tdmpc2_moe",
	version="0.1.0",
	description="Mixture-of-Experts world-model heads for TD-MPC2 with a fused top-k gating operator",
	packages=find_packages(include=["tdmpc2_moe", "tdmpc2_moe.*"]),
	python_requires=">=3.9",
	# torch is deliberately absent: the build uses the torch already installed, and listing it
	# could make pip replace it (e.g. pull a multi-GB CUDA build into a CPU environment).
	install_requires=["numpy", "psutil", "matplotlib", "tqdm"],
	ext_modules=extensions(),
	cmdclass={"build_ext": BuildExtension},
	entry_points={"console_scripts": ["tdmpc2-moe = tdmpc2_moe.cli:main"]},
)
