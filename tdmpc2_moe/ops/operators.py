"""topk_gate: fused top-k softmax gating with statistics and device-side history recording."""
import math
import struct
import warnings

import torch

from . import kernel_check
from .backend import CHOICE, COMPILED, backend, backend_reason  # noqa: F401 (backend, backend_reason: part of ops' API)
from ..settings.checks import check_int, check_number
from .reference import Gate, record_reference, topk_gate_reference

_warned = False


def _first_use(tensor):
	# The self-check runs once per device, in eager mode, on plain tensors (not while torch.compile
	# traces, not on fake or meta tensors); later calls cost one set lookup.
	if tensor.device not in kernel_check._checked and type(tensor) is torch.Tensor \
			and not torch.compiler.is_compiling():
		kernel_check.before_first_use(tensor.device)


def _warn_reference():
	global _warned
	if not _warned and CHOICE != "reference":
		_warned = True
		warnings.warn(f"{backend_reason()}; topk_gate runs the plain-PyTorch reference (slower). Build it with "
					  "`pip install --no-build-isolation .` next to torch, or install a C++ compiler and ninja "
					  "for the build on first import", RuntimeWarning, stacklevel=3)


def _as_float32(value):
	"""Returns `value` rounded to float32 (inf past its range; 0 below its smallest subnormal)."""
	try:
		return struct.unpack("f", struct.pack("f", value))[0]
	except OverflowError:
		return math.inf


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
	check_int("k", k, 1, e)
	check_number("temperature", temperature, positive=True)
	if not 0.0 < _as_float32(temperature) < math.inf:
		raise ValueError(f"temperature must stay finite and > 0 as float32 (what the kernels divide by), got {temperature!r}")
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
	renormalize = bool(renormalize)
	if not COMPILED:
		_warn_reference()
		gate = topk_gate_reference(logits, k, temperature, renormalize)
		if history is not None:
			with torch.no_grad():
				record_reference(history.ring, history.cursor, gate.weights, gate.indices)
		return gate
	_first_use(logits)
	# One registration serves eager calls, torch.compile and opcheck: the schemas' autograd kernel is
	# C++ (csrc/autograd.cpp), their fake kernels are below.
	if history is None:
		return Gate(*_topk_gate(logits, k, temperature, renormalize))
	return Gate(*_topk_gate_record(logits, k, temperature, renormalize, history.ring, history.cursor))


def _outputs_like(logits, k):
	"""Returns empty tensors shaped like the operator's outputs (for the fake kernels)."""
	n, e = logits.shape
	return (logits.new_empty((n, k), dtype=torch.float32), logits.new_empty((n, k), dtype=torch.int64),
			logits.new_empty((e,), dtype=torch.float32), logits.new_empty((e,), dtype=torch.float32),
			logits.new_empty((n,), dtype=torch.float32))


def _check_fake(logits, k):
	torch._check(logits.dim() == 2, lambda: f"logits must be 2-D, got {logits.dim()}-D")
	torch._check(logits.is_floating_point(), lambda: f"logits must be floating point, got {logits.dtype}")
	torch._check(k >= 1, lambda: f"k must be >= 1, got {k}")
	torch._check(k <= logits.shape[1], lambda: f"k must be <= E={logits.shape[1]}, got {k}")


def _gate_fake(logits, k, temperature, renormalize):
	_check_fake(logits, k)
	return _outputs_like(logits, k)


def _check_fake_device(name, tensor, logits):
	# The fake kernel also runs eagerly when one argument is on `meta`: it refuses mixed devices as the
	# device kernels do (ValueError naming the argument).
	torch._check_value(tensor.device == logits.device,
					   lambda: f"{name} must be on the device of logits ({logits.device}), got {tensor.device}")


def _record_fake(logits, k, temperature, renormalize, ring, cursor):
	_check_fake(logits, k)
	_check_fake_device("ring", ring, logits)
	_check_fake_device("cursor", cursor, logits)
	torch._check_value(ring.dim() == 2 and ring.shape[1] == logits.shape[1], lambda: "ring must be [capacity, E]")
	torch._check_value(ring.dtype in (torch.float32, torch.float16, torch.bfloat16),
					   lambda: f"ring must be float32, float16 or bfloat16, got {ring.dtype}")
	torch._check_value(cursor.dtype == torch.int64 and cursor.numel() == 1, lambda: "cursor must be one int64")
	return _outputs_like(logits, k)


def _backward_fake(grad_weights, grad_prob_mean, grad_lse, logits, indices, temperature, renormalize):
	_check_fake_device("indices", indices, logits)
	torch._check_value(indices.dtype == torch.int64, lambda: f"indices must be int64, got {indices.dtype}")
	torch._check_value(indices.dim() == 2 and indices.shape[0] == logits.shape[0], lambda: "indices must be [N, k]")
	for name, grad in (("grad_weights", grad_weights), ("grad_prob_mean", grad_prob_mean), ("grad_lse", grad_lse)):
		if grad is not None:
			_check_fake_device(name, grad, logits)
			torch._check_value(grad.is_floating_point(), lambda: f"{name} must be floating point, got {grad.dtype}")
	return torch.empty_like(logits, memory_format=torch.contiguous_format)


if COMPILED:
	_topk_gate = torch.ops.tdmpc2_moe.topk_gate.default
	_topk_gate_record = torch.ops.tdmpc2_moe.topk_gate_record.default
	torch.library.register_fake("tdmpc2_moe::topk_gate", _gate_fake)
	torch.library.register_fake("tdmpc2_moe::topk_gate_record", _record_fake)
	torch.library.register_fake("tdmpc2_moe::topk_gate_backward", _backward_fake)


# --- Orthonormalisation of expert features (MOORE-style experts, docs/design.md 5a) ---------------------
# Kept apart from the gating code above. A compiled op (csrc/ortho_row.h, its autograd in C++) when the
# extension is built, the plain-PyTorch reference otherwise; benchmarks/test_orthonormalize.py measures
# both against torch.compile of the reference and against a MoEBlock update with the fork's options.
from .reference import ORTHONORMALIZE_EPS, orthonormalize_reference  # noqa: E402


def _orthonormalize_fake(features, eps):
	torch._check_value(features.dim() == 3, lambda: f"features must be 3-D [E, N, D], got {features.dim()}-D")
	torch._check_value(features.is_floating_point(), lambda: f"features must be floating point, got {features.dtype}")
	torch._check_value(features.shape[0] <= features.shape[2],
					   lambda: f"features: n_experts E={features.shape[0]} exceeds the feature width D={features.shape[2]}")
	return torch.empty_like(features, memory_format=torch.contiguous_format)


def _orthonormalize_backward_fake(grad, features, eps):
	_orthonormalize_fake(features, eps)
	torch._check_value(grad.device == features.device,
					   lambda: f"grad must be on the device of features ({features.device}), got {grad.device}")
	torch._check_value(grad.is_floating_point(), lambda: f"grad must be floating point, got {grad.dtype}")
	torch._check_value(grad.shape == features.shape, lambda: f"grad must have the shape of features {tuple(features.shape)}")
	return torch.empty_like(features, memory_format=torch.contiguous_format)


if COMPILED:
	_orthonormalize = torch.ops.tdmpc2_moe.orthonormalize.default
	torch.library.register_fake("tdmpc2_moe::orthonormalize", _orthonormalize_fake)
	torch.library.register_fake("tdmpc2_moe::orthonormalize_backward", _orthonormalize_backward_fake)


def orthonormalize(features, *, eps=ORTHONORMALIZE_EPS):
	"""
	Orthonormalises, per row, the E expert feature vectors that a MoE mixes (Gram-Schmidt in expert
	order, as MOORE, Hendawy et al. 2024). `features` is [E, N, D] (expert-major: expert e's feature of
	row n is `features[e, n]`), floating point, E <= D. Returns [E, N, D] in the input's dtype whose E
	vectors are orthonormal for every row, differentiable. Degenerate vectors (zero, or (near-)parallel
	to the earlier experts' span: residual norm below `eps`) come out as residual / eps, shorter than 1
	and orthogonal to the earlier ones (zero for a zero residual), with finite values and gradients;
	see `orthonormalize_reference`. Runs the compiled op (float64 computed in float64, every other dtype
	in float32, as the reference does; its backward recomputes the forward from `features`) when the
	extension is built, the reference otherwise.
	"""
	if not isinstance(features, torch.Tensor):
		raise ValueError(f"features must be a tensor, got {type(features).__name__}")
	if features.dim() != 3:
		raise ValueError(f"features must be 3-D [E, N, D], got shape {tuple(features.shape)}")
	if not features.is_floating_point():
		raise ValueError(f"features must be floating point, got {features.dtype}")
	e, _, d = features.shape
	if e > d:
		raise ValueError(f"features: n_experts E={e} exceeds the feature width D={d}; at most D vectors "
						 "of width D can be orthonormal")
	check_number("eps", eps, positive=True)
	if COMPILED:
		_first_use(features)
		return _orthonormalize(features, float(eps))
	return orthonormalize_reference(features, float(eps))
