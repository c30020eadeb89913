"""
Running upstream TD-MPC2's CUDA-only code on another device: upstream hard-codes `cuda:0` in its
constructors (agent, buffer, running scale), in `Buffer._init` (which allocates the storage at the
first `add`, long after construction) and in the trainer's CUDA assert. `torch_on(module, device)`
swaps the module's global `torch` for a `TorchOn(device)` while such code runs, so the checkout stays
unmodified and `device=cpu` works on a machine without CUDA. Upstream's Adam (capturable, a CUDA-only
mode) is built there as a CPU Adam: fused, unless `TDMPC2_MOE_CPU_ADAM=loop` (`cpu_adam_fused`).
"""
import contextlib
import os

import torch


class _CudaOn:
	"""`torch.cuda` as seen by upstream code redirected to `device`."""

	def __init__(self, device):
		self._device = device

	def is_available(self):
		"""Returns whether the redirected device can be used (upstream asserts CUDA before training)."""
		return self._device.type != "cuda" or torch.cuda.is_available()

	def mem_get_info(self, *args):
		"""Returns (free, total) bytes of the redirected device; (0, 0) off CUDA, so upstream's buffer stores on the CPU."""
		if self._device.type == "cuda":
			return torch.cuda.mem_get_info(self._device)
		return 0, 0

	def __getattr__(self, name):
		return getattr(torch.cuda, name)


def cpu_adam_fused():
	"""
	Whether Adam on the CPU takes torch's fused kernel (the default) rather than its loop over
	tensors (`TDMPC2_MOE_CPU_ADAM=loop`). The loop makes about seven elementwise passes per parameter
	tensor, the fused kernel one: at batch 64 it made plain's CPU update 3 % faster and the compute-matched
	MoE's, which has more parameters than it runs, 10 % (benchmarks/README.md section 11). The two differ
	in float rounding only; the loop is what this project's CPU runs used before (the committed learning runs).
	"""
	choice = os.environ.get("TDMPC2_MOE_CPU_ADAM", "fused")
	if choice not in ("fused", "loop"):
		raise ValueError(f"TDMPC2_MOE_CPU_ADAM must be 'fused' or 'loop', got {choice!r}")
	return choice == "fused"


class _OptimOn:
	"""
	`torch.optim` whose Adam is capturable only on CUDA (capturable=True rejects CPU parameters) and,
	on the CPU, fused unless the caller chose an implementation (`cpu_adam_fused`). On CUDA it is
	upstream's Adam as upstream asks for it.
	"""

	def __init__(self, device):
		self._device = device

	def Adam(self, *args, capturable=False, **kwargs):
		if self._device.type == "cuda":
			return torch.optim.Adam(*args, capturable=capturable, **kwargs)
		if self._device.type == "cpu" and "fused" not in kwargs and "foreach" not in kwargs and cpu_adam_fused():
			kwargs["fused"] = True
		return torch.optim.Adam(*args, **kwargs)

	def __getattr__(self, name):
		return getattr(torch.optim, name)


class TorchOn:
	"""
	Stands in for the `torch` module inside one upstream module while its CUDA-only code runs:
	`torch.device('cuda:0')` and `device='cuda:0'` arguments of `torch.tensor` mean `device`,
	`torch.cuda` and `torch.optim` are redirected as above, everything else is torch itself.
	"""

	def __init__(self, device):
		self._device = device
		self.cuda = _CudaOn(device)
		self.optim = _OptimOn(device)

	def _map(self, device):
		if device is None:
			return None
		device = torch.device(device)
		return self._device if device.type == "cuda" else device

	def device(self, *args, **kwargs):
		"""Returns torch.device(...) with any CUDA device replaced by the redirected device."""
		return self._map(torch.device(*args, **kwargs))

	def tensor(self, *args, device=None, **kwargs):
		"""Returns torch.tensor(...) placed on the redirected device where upstream asks for CUDA."""
		return torch.tensor(*args, device=self._map(device), **kwargs)

	def __getattr__(self, name):
		return getattr(torch, name)


@contextlib.contextmanager
def torch_on(module, device):
	"""
	Within the block, `module`'s global `torch` is a `TorchOn(device)`; restored on exit.
	Only constructors run under it (never compiled code), so torch.compile sees the real torch.
	No-op when `device` is None.
	"""
	if device is None:
		yield
		return
	previous = module.__dict__["torch"]
	module.torch = TorchOn(device)
	try:
		yield
	finally:
		module.torch = previous
