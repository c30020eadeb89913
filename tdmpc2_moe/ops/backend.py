"""
Which implementation of the operators runs (docs/design.md 3, 17): the compiled extension `_C` when it
loads, else the plain-PyTorch reference, and `TDMPC2_MOE_BACKEND=reference` to choose the reference
even where `_C` is built (a user's way around a faulty kernel). Loading `_C` registers
`torch.ops.tdmpc2_moe.*`. `backend()` and `backend_reason()` say what runs and why.
"""
import os

import torch

from ._extension import load_compiled

BACKEND_ENV = "TDMPC2_MOE_BACKEND"
BACKENDS = ("auto", "reference")
CHOICE = os.environ.get(BACKEND_ENV, "auto") or "auto"
if CHOICE not in BACKENDS:
	raise ValueError(f"{BACKEND_ENV} must be one of {list(BACKENDS)}, got {CHOICE!r}")
if CHOICE == "reference":
	_C, _WHY_REFERENCE = None, f"{BACKEND_ENV}=reference chose the plain-PyTorch reference (the extension is not loaded)"
else:
	_C, _WHY_REFERENCE = load_compiled()
COMPILED = _C is not None
"""True when the compiled kernels run (torch.ops.tdmpc2_moe.* registered), False when the reference does."""


def backend():
	"""Returns "cuda" (compiled CUDA kernels usable), "cpu" (compiled CPU kernels) or "reference"."""
	if not COMPILED:
		return "reference"
	if torch.cuda.is_available() and getattr(_C, "WITH_CUDA", False):
		return "cuda"
	return "cpu"


def backend_reason():
	"""Returns one line saying why `backend()` is what it is (and so why it is not "cuda")."""
	if not COMPILED:
		return _WHY_REFERENCE
	if not getattr(_C, "WITH_CUDA", False):
		return "the extension was built without CUDA kernels (a CPU-only torch, or no nvcc at build time)"
	if not torch.cuda.is_available():
		return "the extension has CUDA kernels, but torch sees no CUDA device"
	return "the extension has CUDA kernels and a CUDA device is available"
