"""
`deterministic=true` (docs/long_runs.md "Reproducible runs"): the same command twice gives the same
run on CUDA too, at a cost. On the CPU a seeded run repeats without it (the patch seeds what upstream
leaves unseeded, patching.py); on CUDA, cuBLAS's split-K reductions, cuDNN's algorithm search and
atomic-add kernels (index_add, scatter_add) otherwise sum in an order that changes run to run.

Applied where the patched agent is built, before its model exists: after upstream's train.py has set
`cudnn.benchmark = True` at import, and before the first cuBLAS call creates its handle (the workspace
variable is read then). The plugin's own kernels are deterministic already (fixed-order reductions,
no float atomics), with or without this.
"""
import os

# The cuBLAS workspace setting PyTorch's reproducibility notes give for deterministic cuBLAS (CUDA >= 10.2).
CUBLAS_WORKSPACE = ":4096:8"


def apply(enabled):
	"""
	With `enabled`, makes this process's torch deterministic and returns what it set ({name: value}):
	`torch.use_deterministic_algorithms(True)` (nondeterministic ops take their deterministic
	implementation, or raise naming themselves), `CUBLAS_WORKSPACE_CONFIG` (unless already set),
	`torch.backends.cudnn.deterministic = True`, `torch.backends.cudnn.benchmark = False`.
	Without, changes nothing and returns {}.
	"""
	if not enabled:
		return {}
	import torch
	os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
	torch.use_deterministic_algorithms(True)
	torch.backends.cudnn.deterministic = True
	torch.backends.cudnn.benchmark = False
	return {"use_deterministic_algorithms": True, "CUBLAS_WORKSPACE_CONFIG": os.environ["CUBLAS_WORKSPACE_CONFIG"],
			"cudnn.deterministic": True, "cudnn.benchmark": False}
