"""
The device the block-level benchmark suites time: `TDMPC2_MOE_BENCH_DEVICE` (default cpu; `cuda` on a
GPU machine, as scripts/gpu_check.sh sets it), and `synced`, which makes a timed callable wait for
that device, so that on CUDA a benchmark times the kernels and not only their launch.
"""
import os

import torch

DEVICE = torch.device(os.environ.get("TDMPC2_MOE_BENCH_DEVICE", "cpu"))


def synced(fn):
	"""Returns `fn`, followed by a synchronisation of DEVICE when it is a CUDA device."""
	if DEVICE.type != "cuda":
		return fn

	def call(*args, **kwargs):
		out = fn(*args, **kwargs)
		torch.cuda.synchronize(DEVICE)
		return out
	return call
