"""topk_gate: fused top-k softmax gating with statistics and device-side history recording."""
import math
import warnings

import torch

from .reference import Gate, record_reference, topk_gate_reference

try:
	from . import _C  # noqa: F401  (importing registers torch.ops.tdmpc2_moe.*)
	_HAVE_C = True
except ImportError as exc:
	_HAVE_C = False
	_IMPORT_ERROR = exc

_warned = False


def backend():
	"""Returns "cuda" (compiled CUDA kernels usable), "cpu" (compiled CPU kernels) or "reference"."""
	if not _HAVE_C:
		return "reference"
	if torch.cuda.is_available() and getattr(_C, "WITH_CUDA", False):
		return "cuda"
	return "cpu"


def _warn_reference():
	global _warned
	if not _warned:
		_warned = True
		warnings.warn(f"tdmpc2_moe._C is not built ({_IMPORT_ERROR}); topk_gate runs the plain-PyTorch "
					  "reference. Build with `pip install --no-build-isolation .`", RuntimeWarning, stacklevel=3)


def _check_args(logits, k, temperature, history):
	if not isinstance(logits, torch.Tensor):
		raise ValueError(f"logits must be a tensor, got {type(logits).__name__}")
	if logits.dim() != 2:
		raise ValueError(f"logits must be 2-D [N, E], got shape {tuple(logits.shape)}")
	if not logits.is_floating_point():
		raise ValueError(f"logits must be floating point, got {logits.dtype}")
	e = logits.shape[1]
	if not 1 <= e <= 1024:
		raise ValueError(f"logits must have 1..1024 experts (columns), got {e}")
	if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= e:
		raise ValueError(f"k must be an int in 1..E={e}, got {k!r}")
	if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
			or not math.isfinite(temperature) or temperature <= 0:
		raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
	if history is not None:
		if history.n_experts != e:
			raise ValueError(f"history records {history.n_experts} experts but logits have E={e}")
		if history.ring.device != logits.device:
			raise ValueError(f"history is on {history.ring.device} but logits are on {logits.device}")


def topk_gate(logits, k, *, temperature=1.0, renormalize=True, history=None) -> Gate:
	"""
	Top-k softmax gating of `logits` [N, E]. Returns a `Gate` (weights [N, k] float32, indices [N, k]
	int64, expert_prob_mean [E], expert_frac [E], lse [N]). With `history` (a GateHistory) each row's
	dense routing vector is written into its ring on the device.
	"""
	_check_args(logits, k, temperature, history)
	temperature = float(temperature)
	if not _HAVE_C:
		_warn_reference()
		gate = topk_gate_reference(logits, k, temperature, renormalize)
		if history is not None:
			with torch.no_grad():
				record_reference(history.ring, history.cursor, gate.weights, gate.indices)
		return gate
	raise NotImplementedError("compiled path is added with the extension")
