"""
The self-check of the compiled kernels (docs/design.md 17): before a compiled op first runs on a
device in a process, its kernels are run once on a small fixed set of cases on that device and
compared with the plain-PyTorch reference on the same device. A mismatch raises `SelfCheckError`,
naming the op, the case and the difference, and how to run without the kernels
(`TDMPC2_MOE_BACKEND=reference`), instead of letting a wrong kernel route a training run silently.

Cases: E <= 32 (a thread per row on CUDA) and E > 32 (a block per row), k = 1, k = E, ties,
non-finite rows, more rows than the ring (the ring wraps), bfloat16 logits and ring; the statistics
(probability means, pick fractions: summed across blocks on CUDA), the backward, and orthonormalize
forward and backward including a degenerate vector; routed_experts forward, inference and backward over
Mish, SimNorm and plain layers, k = 1 and 2, an idle expert. Everything goes through the dispatcher
(`torch.ops.tdmpc2_moe.*`), as user code reaches the kernels.

`TDMPC2_MOE_SELF_CHECK=0` skips the automatic check; `self_check(device)` always runs it.
"""
import os
import time

import torch

from .backend import BACKEND_ENV, backend
from .reference import (EXPERT_ACTIVATIONS, ORTHONORMALIZE_EPS, orthonormalize_reference, record_reference,
						routed_experts_reference, topk_gate_backward_reference, topk_gate_reference)

ENV = "TDMPC2_MOE_SELF_CHECK"
# (name, rows, experts, k, logits dtype, renormalize, temperature, ring capacity, special rows)
GATE_CASES = [
	("E=8 k=2", 37, 8, 2, torch.float32, True, 1.0, 64, None),
	("E=8 k=1", 37, 8, 1, torch.float32, True, 0.7, 64, None),
	("E=8 k=E", 37, 8, 8, torch.float32, False, 1.3, 64, None),
	("E=40 k=3", 29, 40, 3, torch.float32, True, 1.0, 64, None),
	("E=40 k=E", 29, 40, 40, torch.float32, True, 1.8, 64, None),
	("E=1000 k=8", 5, 1000, 8, torch.float32, True, 1.0, 8, None),
	("ties", 16, 12, 3, torch.float32, True, 1.0, 64, "ties"),
	("non-finite rows", 12, 6, 2, torch.float32, True, 1.0, 64, "non-finite"),
	("more rows than the ring", 37, 8, 2, torch.float32, True, 1.0, 5, None),
	("bf16 E=48 k=4", 33, 48, 4, torch.bfloat16, True, 1.0, 64, None),
]
ORTHO_CASES = [("E=4 D=16", 4, 9, 16, None), ("E=D=8", 8, 5, 8, None), ("degenerate vector", 4, 6, 12, "degenerate")]
# routed_experts: (name, experts, rows, top_k, widths in -> ... -> out, one activation per layer). The last
# routes every row to experts 0 and 1 only, so that an expert with no rows is covered.
EXPERT_CASES = [("E=4 k=2 mish,mish,none", 4, 11, 2, (6, 10, 10, 5), ("mish", "mish", "none")),
				("E=8 k=1 simnorm", 8, 7, 1, (5, 8, 16), ("mish", "simnorm")),
				("E=3 k=2 expert 2 idle", 3, 6, 2, (4, 6, 3), ("mish", "none"))]
TOLERANCE = dict(rtol=1e-4, atol=1e-5)  # bf16 inputs are compared after both sides computed in float32

_checked = set()  # devices whose kernels passed (or whose check was skipped) in this process


class SelfCheckError(RuntimeError):
	"""A compiled kernel disagrees with the reference on the self-check's cases."""


def _device(device):
	device = torch.device("cuda" if device is None and torch.cuda.is_available() else device or "cpu")
	if device.type == "cuda" and device.index is None:
		device = torch.device("cuda", torch.cuda.current_device())
	return device


def _logits(case, device, g):
	name, n, e, _, dtype, *_, special = case
	x = torch.randn(n, e, generator=g) * 2
	if special == "ties":
		x = torch.round(x)  # many equal values per row: ties go to the lower expert index
		x[0] = 0.0
	elif special == "non-finite":
		x[1, 2] = float("inf")
		x[2] = float("-inf")
		x[3, 0] = float("nan")
		x[4, :] = float("inf")
	return x.to(device=device, dtype=dtype)


def _mismatch(got, want):
	"""Returns None when `got` equals `want` (integers exactly, floats within TOLERANCE, NaN where NaN), else what differs."""
	if got.shape != want.shape:
		return f"shape {tuple(got.shape)} instead of {tuple(want.shape)}"
	if not got.is_floating_point():
		bad = got != want
		return None if not bool(bad.any()) else f"{int(bad.sum())} of {bad.numel()} values differ"
	got, want = got.double(), want.double()
	both_nan = torch.isnan(got) & torch.isnan(want)
	close = (got == want) | ((got - want).abs() <= TOLERANCE["atol"] + TOLERANCE["rtol"] * want.abs()) | both_nan
	if bool(close.all()):
		return None
	worst = torch.where(close, torch.zeros_like(got), (got - want).abs().nan_to_num(float("inf"))).max()
	return f"{int((~close).sum())} of {close.numel()} values differ, largest difference {float(worst):.3g}"


def _compare(op, case, name, got, want):
	# Hand-written rather than torch.testing.assert_close, whose first call imports torch.distributed.tensor (~0.8 s).
	diff = _mismatch(got, want)
	if diff is not None:
		raise SelfCheckError(
			f"tdmpc2_moe self-check: {op} on {got.device} disagrees with the reference in case '{case}', "
			f"output {name}: {diff}. The compiled kernel is wrong on this device; run without it with "
			f"{BACKEND_ENV}=reference (and report it with the output of `tdmpc2-moe doctor`)")


def _check_gate(case, device, g):
	name, n, e, k, dtype, renorm, temperature, capacity, _ = case
	logits = _logits(case, device, g)
	ref = topk_gate_reference(logits, k, temperature, renorm)
	out = torch.ops.tdmpc2_moe.topk_gate(logits, k, temperature, renorm)
	for field, got, want in zip(ref._fields, out, ref):
		_compare("topk_gate", name, field, got, want)
	ring_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
	ring, cursor = torch.zeros(capacity, e, dtype=ring_dtype, device=device), torch.tensor(3, device=device)
	ref_ring, ref_cursor = ring.clone(), cursor.clone()
	recorded = torch.ops.tdmpc2_moe.topk_gate_record(logits, k, temperature, renorm, ring, cursor)
	record_reference(ref_ring, ref_cursor, ref.weights, ref.indices)
	_compare("topk_gate_record", name, "weights", recorded[0], ref.weights)
	_compare("topk_gate_record (ring write)", name, "ring", ring, ref_ring)
	_compare("topk_gate_record (ring write)", name, "cursor", cursor, ref_cursor)
	finite = torch.isfinite(logits.float()).all(-1)
	if bool(finite.all()):
		grads = [torch.randn(n, k, generator=g).to(device), torch.randn(e, generator=g).to(device),
				 torch.randn(n, generator=g).to(device)]
		got = torch.ops.tdmpc2_moe.topk_gate_backward(*grads, logits, ref.indices, temperature, renorm)
		want = topk_gate_backward_reference(*grads, logits, ref.indices, k, temperature, renorm)
		_compare("topk_gate_backward", name, "grad_logits", got, want)
	return n


def _check_orthonormalize(case, device, g):
	name, e, n, d, special = case
	x = torch.randn(e, n, d, generator=g)
	if special == "degenerate":
		x[2] = 0.0  # a dead expert: its residual is exactly zero, its output the zero vector
	x = x.to(device)
	_compare("orthonormalize", name, "q", torch.ops.tdmpc2_moe.orthonormalize(x, ORTHONORMALIZE_EPS),
			 orthonormalize_reference(x, ORTHONORMALIZE_EPS))
	grad = torch.randn(e, n, d, generator=g).to(device)
	leaf = x.clone().requires_grad_(True)
	with torch.enable_grad():
		# The gradient of <output, grad>, a scalar: torch.autograd.grad with an explicit output gradient
		# would import sympy on its first call in a process (~0.25 s), which an inference-only run never needs.
		want, = torch.autograd.grad((orthonormalize_reference(leaf, ORTHONORMALIZE_EPS) * grad).sum(), leaf)
	got = torch.ops.tdmpc2_moe.orthonormalize_backward(grad, x, ORTHONORMALIZE_EPS)
	_compare("orthonormalize_backward", name, "grad_features", got, want)


def _check_routed_experts(case, device, g):
	name, e, n, k, widths, activations = case
	x = torch.randn(n, widths[0], generator=g)
	if name.endswith("idle"):
		indices = torch.tensor([[0, 1]] * n)
	else:
		indices = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)])
	weights = torch.rand(n, k, generator=g)
	params = []
	for i, activation in enumerate(activations):
		params += [torch.randn(e, widths[i + 1], widths[i], generator=g) * 0.3, torch.randn(e, widths[i + 1], generator=g)]
		if activation != "none":
			params += [1 + 0.1 * torch.randn(e, widths[i + 1], generator=g), 0.1 * torch.randn(e, widths[i + 1], generator=g)]
	x, indices, weights = x.to(device), indices.to(device), weights.to(device)
	params = [p.to(device) for p in params]
	codes = [EXPERT_ACTIVATIONS.index(a) for a in activations]
	group = 8 if "simnorm" in activations else 1
	got, saved = torch.ops.tdmpc2_moe.routed_experts_train(x, indices, weights, params, codes, group)
	leaves = [t.clone().requires_grad_(True) for t in (x, weights, *params)]
	with torch.enable_grad():
		want = routed_experts_reference(leaves[0], indices, leaves[1], leaves[2:], activations, group)
		grad = torch.randn(want.shape, generator=g).to(device)
		wanted = torch.autograd.grad((want * grad).sum(), leaves)
	_compare("routed_experts", name, "out", got, want.detach())
	_compare("routed_experts", name, "out (inference)",
			 torch.ops.tdmpc2_moe.routed_experts(x, indices, weights, params, codes, group), want.detach())
	grad_x, grad_weights, grad_params = torch.ops.tdmpc2_moe.routed_experts_backward(
		grad, x, indices, weights, params, saved, codes, group, True)
	for field, got_grad, want_grad in zip(("grad_x", "grad_weights", *(f"grad_params[{i}]" for i in range(len(params)))),
										  (grad_x, grad_weights, *grad_params), wanted):
		_compare("routed_experts_backward", name, field, got_grad, want_grad)


def self_check(device=None):
	"""
	Runs the compiled kernels on `device` (default: the current CUDA device when there is one, else
	the CPU) on the fixed cases and compares them with the reference there. Returns {"device",
	"backend", "cases", "seconds"}; without compiled kernels ("reference" backend) there is nothing to
	check and "cases" is 0. Raises SelfCheckError naming the op, the case and the difference.
	"""
	device = _device(device)
	if backend() == "reference" or (device.type == "cuda" and backend() != "cuda"):
		return {"device": str(device), "backend": backend(), "cases": 0, "seconds": 0.0}
	start = time.perf_counter()
	g = torch.Generator().manual_seed(20261204)
	sync_mode = torch.cuda.get_sync_debug_mode() if device.type == "cuda" else None
	if sync_mode:
		torch.cuda.set_sync_debug_mode(0)  # a one-time check may sync; a "no sync" test's own mode is restored
	try:
		with torch.no_grad():
			for case in GATE_CASES:
				_check_gate(case, device, g)
			for case in ORTHO_CASES:
				_check_orthonormalize(case, device, g)
			for case in EXPERT_CASES:
				_check_routed_experts(case, device, g)
		if device.type == "cuda":
			torch.cuda.synchronize(device)
	finally:
		if sync_mode:
			torch.cuda.set_sync_debug_mode(sync_mode)
	_checked.add(device)
	return {"device": str(device), "backend": backend(), "cases": len(GATE_CASES) + len(ORTHO_CASES) + len(EXPERT_CASES),
			"seconds": time.perf_counter() - start}


def before_first_use(device):
	"""
	Runs `self_check(device)` the first time a compiled op is called on `device` in this process
	(unless TDMPC2_MOE_SELF_CHECK=0, or while a CUDA graph is being captured). A failed check is not
	remembered as passed: every later call raises again.
	"""
	if device.type == "meta":
		return
	device = _device(device)
	if device in _checked:
		return
	if os.environ.get(ENV, "1") == "0" or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
		_checked.add(device)
		return
	self_check(device)
