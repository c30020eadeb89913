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


# --- Routed experts (docs/design.md 22) ---------------------------------------------------------------
# A block's routed experts as one compiled op: grouping, every layer of each expert on its rows, the
# weighted combination; its autograd in C++ (csrc/autograd.cpp) runs a training forward that keeps what
# the backward op reads. The reference otherwise.
from .reference import EXPERT_ACTIVATIONS, routed_experts_reference  # noqa: E402

_ACTIVATION_CODES = {name: code for code, name in enumerate(EXPERT_ACTIVATIONS)}


def _expert_widths(x, params, activations):
	"""Returns the output width of each layer (fake kernels): params hold 2 tensors per plain layer, 4 per normed one."""
	widths, p = [], 0
	for code in activations:
		torch._check_value(0 <= code <= 2, lambda: f"activations must be 0, 1 or 2, got {code}")
		widths.append(params[p].shape[1])
		p += 2 if code == 0 else 4
	torch._check_value(p == len(params), lambda: f"params must hold {p} tensors for {len(activations)} layers, got {len(params)}")
	return widths


def _check_experts_fake(x, indices, weights, params):
	torch._check_value(x.dim() == 2, lambda: f"x must be 2-D [N, in], got {x.dim()}-D")
	torch._check_value(x.dtype in (torch.float32, torch.float64), lambda: f"x must be float32 or float64, got {x.dtype}")
	for name, t in (("indices", indices), ("weights", weights), *((f"params[{i}]", p) for i, p in enumerate(params))):
		_check_fake_device(name, t, x)
	torch._check_value(indices.dtype == torch.int64 and indices.dim() == 2, lambda: "indices must be int64 [N, k]")
	torch._check_value(weights.shape == indices.shape, lambda: "weights must have the shape of indices")


def _routed_experts_fake(x, indices, weights, params, activations, simnorm_dim):
	_check_experts_fake(x, indices, weights, params)
	return x.new_empty(x.shape[0], _expert_widths(x, params, activations)[-1])


def _routed_experts_train_fake(x, indices, weights, params, activations, simnorm_dim):
	_check_experts_fake(x, indices, weights, params)
	widths = _expert_widths(x, params, activations)
	s, e = x.shape[0] * indices.shape[1], params[0].shape[0]
	saved = [x.new_empty(2 * s + e + 1, dtype=torch.int64), x.new_empty(s, x.shape[1])]
	saved += [x.new_empty(s, w) for w in widths]
	for code, w in zip(activations, widths):
		if code != 0:
			saved += [x.new_empty(s, w), x.new_empty(s)]
	return x.new_empty(x.shape[0], widths[-1]), saved


def _routed_experts_backward_fake(grad_out, x, indices, weights, params, saved, activations, simnorm_dim, input_grad):
	_check_experts_fake(x, indices, weights, params)
	_check_fake_device("grad_out", grad_out, x)
	grad_x = x.new_empty(x.shape) if input_grad else x.new_empty(0)
	return grad_x, weights.new_empty(weights.shape), [torch.empty_like(p, memory_format=torch.contiguous_format)
													  for p in params]


if COMPILED:
	_routed_experts = torch.ops.tdmpc2_moe.routed_experts.default
	torch.library.register_fake("tdmpc2_moe::routed_experts", _routed_experts_fake)
	torch.library.register_fake("tdmpc2_moe::routed_experts_train", _routed_experts_train_fake)
	torch.library.register_fake("tdmpc2_moe::routed_experts_backward", _routed_experts_backward_fake)


def routed_experts_runs_on(device):
	"""
	Returns whether the compiled routed_experts has a kernel for `device` (a torch.device): the CPU whenever
	the extension is built, CUDA when it was built with its CUDA kernels and torch sees a GPU (`backend()`
	is "cuda", as for topk_gate). The CUDA kernels have run on the SIMT emulator only, never on a GPU
	(docs/gpu.md); the self-check compares them with the reference before their first use on a device.
	"""
	return COMPILED and (device.type == "cpu" or (device.type == "cuda" and backend() == "cuda"))


def routed_experts(x, indices, weights, params, activations, *, simnorm_dim=8):
	"""
	Runs a block's routed experts on their rows and returns the weighted combination: out[r] = sum_j
	weights[r, j] * expert_{indices[r, j]}(x[r]), [N, out]. `x` [N, in] float32 or float64 (any strides);
	`indices` [N, k] int64 and `weights` [N, k] (a Gate's); `params` the stacked parameters layer after
	layer: weight [E, out, in] and bias [E, out], then for a normed layer LayerNorm weight and bias
	[E, out]; `activations` one name per layer from EXPERT_ACTIVATIONS ("none": a plain Linear; "mish":
	LayerNorm then Mish; "simnorm": LayerNorm then softmax over groups of `simnorm_dim`). Differentiable in
	x, weights and params. The compiled op when the extension is built (grouping by a counting sort, each
	expert's layers on exactly its rows, bias, LayerNorm and activation fused into one pass per layer);
	the reference otherwise (and on devices without a kernel). On the CPU indices outside [0, E) raise
	ValueError; on CUDA they are not checked (that would synchronise with the host): the rows that hold
	one come out NaN, with their input gradient and that slot's routing-weight gradient.
	"""
	if not isinstance(x, torch.Tensor) or not isinstance(indices, torch.Tensor) or not isinstance(weights, torch.Tensor):
		raise ValueError("x, indices and weights must be tensors")
	try:
		codes = [_ACTIVATION_CODES[a] for a in activations]
	except (KeyError, TypeError):
		raise ValueError(f"activations must name one of {list(EXPERT_ACTIVATIONS)} per layer, got {activations!r}") from None
	check_int("simnorm_dim", simnorm_dim, 1)
	if routed_experts_runs_on(x.device):
		_first_use(x)
		return _routed_experts(x, indices, weights, list(params), codes, simnorm_dim)
	return routed_experts_reference(x, indices, weights, params, activations, simnorm_dim)
