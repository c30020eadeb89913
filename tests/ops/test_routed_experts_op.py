"""
The compiled routed-experts op (csrc/cpu/routed_experts.cpp, docs/design.md 22) against the plain-PyTorch
reference over a grid of routings (experts without rows, one row, every row to one expert, k = 1..E,
repeated experts in a row, no rows, non-contiguous input) and layer stacks (TD-MPC2's reward/pi heads:
Mish, Mish, plain Linear; its dynamics head: Mish, Mish, SimNorm; a shared head's hidden layers; one
layer): values and the gradients of x, routing weights and every parameter; float64 to rounding, float32
within float32 rounding of the float64 result; the same bits on every call; argument errors; opcheck;
torch.compile(fullgraph=True). Parametrised over devices.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import DEVICES
from tdmpc2_moe.ops import operators as ops
from tdmpc2_moe.ops.reference import routed_experts_reference

pytestmark = pytest.mark.skipif(ops.backend() == "reference", reason="tdmpc2_moe._C is not built")

STACKS = {
	"reward": (["mish", "mish", "none"], [11, 16, 16, 5]),
	"dynamics": (["mish", "mish", "simnorm"], [11, 16, 16, 8]),
	"shared head hidden": (["mish", "mish"], [11, 16, 12]),
	"one linear": (["none"], [11, 6]),
}
SIMNORM = 4


def routing(kind, n, e, k, g):
	"""Returns indices [n, k] of a routing `kind` and routing weights [n, k]."""
	if kind == "distinct":
		idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)]) if n else torch.zeros(0, k, dtype=torch.long)
	elif kind == "one expert":
		idx = torch.full((n, k), e - 1, dtype=torch.long)
	else:  # "random": repeats within a row allowed, some experts left without rows
		idx = torch.randint(0, max(1, e // 2), (n, k), generator=g)
	return idx, torch.rand(n, k, generator=g) + 0.1


def make_params(activations, dims, e, dtype, g):
	params = []
	for i, a in enumerate(activations):
		params += [torch.randn(e, dims[i + 1], dims[i], generator=g, dtype=dtype) * 0.4,
				   torch.randn(e, dims[i + 1], generator=g, dtype=dtype) * 0.2]
		if a != "none":
			params += [1 + 0.2 * torch.randn(e, dims[i + 1], generator=g, dtype=dtype),
					   0.2 * torch.randn(e, dims[i + 1], generator=g, dtype=dtype)]
	return params


def values_and_grads(fn, x, idx, w, params, activations, grad_out):
	"""Returns fn's output and the gradients of sum(out * grad_out) in x, w and each param (leaf copies)."""
	x = x.detach().requires_grad_(True)  # no clone: a clone of a strided slice would be contiguous
	w = w.detach().clone().requires_grad_(True)
	params = [p.detach().clone().requires_grad_(True) for p in params]
	out = fn(x, idx, w, params, activations)
	grads = torch.autograd.grad((out * grad_out).sum(), [x, w, *params], allow_unused=True)
	return [out.detach()] + [torch.zeros_like(t) if gr is None else gr for gr, t in zip(grads, [x, w, *params])]


def op(x, idx, w, params, activations):
	return ops.routed_experts(x, idx, w, params, activations, simnorm_dim=SIMNORM)


def ref(x, idx, w, params, activations):
	return routed_experts_reference(x, idx, w, params, activations, SIMNORM)


def rel_err(a, b):
	return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


ROUTINGS = [(n, e, k, kind) for n, e, k, kind in [
	(0, 4, 2, "distinct"), (1, 4, 2, "distinct"), (1, 8, 1, "distinct"), (37, 8, 2, "random"),
	(37, 4, 1, "distinct"), (37, 4, 2, "distinct"), (37, 4, 3, "distinct"), (37, 4, 4, "distinct"),
	(50, 5, 2, "one expert"), (3, 8, 2, "distinct"), (200, 8, 2, "distinct")]]


def case_inputs(stack, n, e, k, kind, dtype, device="cpu"):
	"""
	Returns (activations, x, idx, w, params, grad_out) of one grid case (a head's layer stack, a routing) in
	`dtype` on `device`, drawn in float64 from a seed of the case: the same values at either dtype. Every
	other case reads x through strides (a column slice of a wider tensor). w stays a Gate's float32 in a
	float32 case (the op takes routing weights of x's dtype or float32).
	"""
	activations, dims = STACKS[stack]
	g = torch.Generator().manual_seed(n * 131 + e * 7 + k)
	wide = torch.randn(n, dims[0] * 2, generator=g, dtype=torch.float64)
	x = wide[:, ::2] if (n + k) % 2 else wide[:, :dims[0]].contiguous()
	idx, w = routing(kind, n, e, k, g)
	params = make_params(activations, dims, e, torch.float64, g)
	grad_out = torch.randn(n, dims[-1], generator=g, dtype=torch.float64)
	w = w.to(device, dtype) if dtype == torch.float64 else w.to(device)
	return (activations, x.to(device, dtype), idx.to(device), w, [p.to(device, dtype) for p in params],
			grad_out.to(device, dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stack", list(STACKS))
@pytest.mark.parametrize("n, e, k, kind", ROUTINGS, ids=[f"n{n}-e{e}-k{k}-{kind}" for n, e, k, kind in ROUTINGS])
def test_values_and_gradients_match_the_reference(device, stack, n, e, k, kind):
	# float64: the op computes in float64 as the reference does.
	activations, *case = case_inputs(stack, n, e, k, kind, torch.float64, device)
	got = values_and_grads(op, *case[:4], activations, case[4])
	want = values_and_grads(ref, *case[:4], activations, case[4])
	assert got[0].shape == (n, STACKS[stack][1][-1]) and got[0].dtype == torch.float64
	for a, b in zip(got, want):
		torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
	if n == 0:
		return
	# float32 against the float64 result: within twice the float32 reference's own distance from it
	# (the same operations in float32, in other summation orders) plus a few float32 ulps.
	activations, *case = case_inputs(stack, n, e, k, kind, torch.float32, device)
	got32 = values_and_grads(op, *case[:4], activations, case[4])
	ref32 = values_and_grads(ref, *case[:4], activations, case[4])
	for a, r, b in zip(got32, ref32, want):
		assert a.dtype == r.dtype and a.shape == b.shape
		assert rel_err(a, b) <= 2 * rel_err(r, b) + 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_the_same_bits_on_every_call(device):
	activations, dims = STACKS["dynamics"]
	g = torch.Generator().manual_seed(3)
	x = torch.randn(300, dims[0], generator=g).to(device)
	idx, w = routing("distinct", 300, 8, 2, g)
	params = [p.to(device) for p in make_params(activations, dims, 8, torch.float32, g)]
	grad_out = torch.randn(300, dims[-1], generator=g).to(device)
	first = values_and_grads(op, x, idx.to(device), w.to(device), params, activations, grad_out)
	for _ in range(2):
		again = values_and_grads(op, x, idx.to(device), w.to(device), params, activations, grad_out)
		assert all(torch.equal(a, b) for a, b in zip(first, again))
	with torch.no_grad():
		assert torch.equal(op(x, idx.to(device), w.to(device), params, activations), first[0])


_ATEN_GEMM_CHECK = """
import sys, torch
sys.path[:0] = [{here!r}, {tests!r}]
import test_routed_experts_op as t
from tdmpc2_moe import backend
assert backend() == "cpu", backend()
for stack in t.STACKS:
	activations, x, idx, w, params, grad_out = t.case_inputs(stack, 40, 8, 2, "random", torch.float64)
	got = t.values_and_grads(t.op, x, idx, w, params, activations, grad_out)
	want = t.values_and_grads(t.ref, x, idx, w, params, activations, grad_out)
	for a, b in zip(got, want):
		torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
print(t.mm_calls_inside_the_op())
"""


def mm_calls_inside_the_op():
	"""Returns how many aten::mm calls one forward and backward of the op makes (0: its GEMMs call BLAS)."""
	activations, dims = STACKS["reward"]
	g = torch.Generator().manual_seed(6)
	x, grad_out = torch.randn(30, dims[0], generator=g), torch.randn(30, dims[-1], generator=g)
	idx, w = routing("distinct", 30, 4, 2, g)
	params = make_params(activations, dims, 4, torch.float32, g)
	with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
		values_and_grads(op, x, idx, w, params, activations, grad_out)
	return sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::mm.out"))


def test_the_gemms_without_blas_match_the_reference():
	# TDMPC2_MOE_CPU_GEMM=aten: every GEMM through at::mm, as on a torch without a BLAS to call directly.
	here = Path(__file__).resolve().parent
	done = subprocess.run([sys.executable, "-c", _ATEN_GEMM_CHECK.format(here=str(here), tests=str(here.parent))],
						  capture_output=True, text=True, env=dict(os.environ, TDMPC2_MOE_CPU_GEMM="aten"), cwd=here)
	assert done.returncode == 0, done.stdout + done.stderr
	assert int(done.stdout.split()[-1]) > 0  # the knob took at::mm
	assert mm_calls_inside_the_op() == 0  # and by default the op calls BLAS itself


def test_mish_and_simnorm_are_right_at_the_extremes():
	# Large pre-activations (Mish linear from 20, SimNorm's max subtracted), very negative ones (exp
	# underflow) and a constant row (LayerNorm of zero variance).
	activations, dims = ["mish", "simnorm"], [3, 8, 8]
	params = make_params(activations, dims, 2, torch.float32, torch.Generator().manual_seed(5))
	params[0].mul_(40)
	x = torch.tensor([[1.0, -2.0, 3.0], [0.0, 0.0, 0.0], [50.0, -80.0, 9.0]])
	params[0][:, 0] = 0.0  # one feature constant across rows
	idx, w = torch.tensor([[0, 1], [1, 0], [0, 1]]), torch.rand(3, 2)
	torch.testing.assert_close(op(x, idx, w, params, activations), ref(x, idx, w, params, activations),
							   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("change, name", [
	(lambda a: a.update(x=a["x"].long()), "x"),
	(lambda a: a.update(x=a["x"][0]), "x"),
	(lambda a: a.update(indices=a["indices"].int()), "indices"),
	(lambda a: a.update(indices=a["indices"][:2]), "indices"),
	(lambda a: a.update(indices=a["indices"] + 5), "indices"),
	(lambda a: a.update(weights=a["weights"][:, :1]), "weights"),
	(lambda a: a.update(weights=a["weights"].to("meta")), "weights"),
	(lambda a: a.update(params=a["params"][:-1]), "params"),
	(lambda a: a.update(params=[a["params"][0].double(), *a["params"][1:]]), "params"),
	(lambda a: a.update(params=[a["params"][0][:, :, :3], *a["params"][1:]]), "params"),
	(lambda a: a.update(params=[a["params"][0], a["params"][1][:1], *a["params"][2:]]), "params"),
	(lambda a: a.update(activations=[1, 1, 7]), "activations"),
	(lambda a: a.update(activations=[1, 2, 0], simnorm_dim=3), "simnorm_dim"),
])
def test_the_op_checks_its_arguments(change, name):
	g = torch.Generator().manual_seed(6)
	activations, dims = STACKS["reward"]
	idx, w = routing("distinct", 4, 4, 2, g)
	args = dict(x=torch.randn(4, dims[0]), indices=idx, weights=w,
				params=make_params(activations, dims, 4, torch.float32, g), activations=[1, 1, 0], simnorm_dim=4)
	change(args)
	with pytest.raises(ValueError, match=name):
		torch.ops.tdmpc2_moe.routed_experts(args["x"], args["indices"], args["weights"], args["params"],
											args["activations"], args["simnorm_dim"])


def test_the_python_function_names_bad_activations():
	with pytest.raises(ValueError, match="activations"):
		ops.routed_experts(torch.randn(2, 3), torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1),
						   [torch.randn(1, 4, 3), torch.randn(1, 4)], ["relu"])


def test_the_backward_op_checks_saved():
	g = torch.Generator().manual_seed(7)
	activations, dims = STACKS["reward"]
	idx, w = routing("distinct", 4, 4, 2, g)
	x, params = torch.randn(4, dims[0]), make_params(activations, dims, 4, torch.float32, g)
	out, saved = torch.ops.tdmpc2_moe.routed_experts_train(x, idx, w, params, [1, 1, 0], 4)
	backward = torch.ops.tdmpc2_moe.routed_experts_backward
	with pytest.raises(ValueError, match="saved"):
		backward(torch.ones_like(out), x, idx, w, params, saved[:-1], [1, 1, 0], 4, True)
	with pytest.raises(ValueError, match="grad_out"):
		backward(torch.ones(4, 2), x, idx, w, params, saved, [1, 1, 0], 4, True)


def test_opcheck():
	g = torch.Generator().manual_seed(8)
	for stack, k in (("dynamics", 2), ("reward", 1)):
		activations, dims = STACKS[stack]
		codes = [ops._ACTIVATION_CODES[a] for a in activations]
		for dtype in (torch.float32, torch.float64):
			idx, w = routing("random", 9, 4, k, g)
			x = torch.randn(9, dims[0], generator=g, dtype=dtype).requires_grad_()
			params = [p.requires_grad_() for p in make_params(activations, dims, 4, dtype, g)]
			args = (x, idx, w.requires_grad_(), params, codes, SIMNORM)
			torch.library.opcheck(torch.ops.tdmpc2_moe.routed_experts.default, args)
			torch.library.opcheck(torch.ops.tdmpc2_moe.routed_experts_train.default,
								  (x.detach(), idx, w.detach(), [p.detach() for p in params], codes, SIMNORM))


@pytest.mark.slow
@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_compiles_fullgraph(compile_backend):
	torch._dynamo.reset()
	g = torch.Generator().manual_seed(9)
	activations, dims = STACKS["dynamics"]
	idx, w = routing("distinct", 33, 8, 2, g)
	params = [p.requires_grad_() for p in make_params(activations, dims, 8, torch.float32, g)]
	x = torch.randn(33, dims[0], generator=g, requires_grad=True)
	grad_out = torch.randn(33, dims[-1], generator=g)

	def loss(x, w):
		return (op(x * 2, idx, w, params, activations) * grad_out).sum()
	compiled = torch.compile(loss, fullgraph=True, backend=compile_backend)
	wl = w.clone().requires_grad_()
	got = torch.autograd.grad(compiled(x, wl), [x, wl, *params])
	want = torch.autograd.grad(loss(x, wl), [x, wl, *params])
	for a, b in zip(got, want):
		torch.testing.assert_close(a, b)
