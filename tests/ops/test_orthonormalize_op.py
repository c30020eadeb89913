"""
The compiled orthonormalisation op (csrc/ortho_row.h run by cpu/orthonormalize.cpp) against the
plain-PyTorch reference: values and gradients over a grid of shapes, degenerate rows, argument errors of
the op itself, opcheck and torch.compile(fullgraph=True).
"""
import pytest
import torch

from tdmpc2_moe.ops import operators as ops
from tdmpc2_moe.ops.operators import backend, orthonormalize
from tdmpc2_moe.ops.reference import orthonormalize_reference

pytestmark = pytest.mark.skipif(backend() == "reference", reason="tdmpc2_moe._C is not built")

EPS = 1e-4


def values_and_grad(fn, x, w):
	"""Returns fn(x) and d(sum(fn(x) * w))/dx, for a leaf copy of x."""
	x = x.detach().clone().requires_grad_(True)
	out = fn(x)
	(grad,) = torch.autograd.grad((out * w).sum(), x)
	return out.detach(), grad


def rel_err(a, b):
	return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


@pytest.mark.parametrize("n", [0, 1, 7, 300])
@pytest.mark.parametrize("d", ["E", 17, 64, 512])
@pytest.mark.parametrize("e", [1, 2, 4, 8])
def test_values_and_gradients_match_the_reference(e, d, n):
	d = e if d == "E" else d
	torch.manual_seed(e * 1000 + d + n)
	x = torch.randn(e, n, d, dtype=torch.float64)
	w = torch.randn(e, n, d, dtype=torch.float64)
	# float64: the op computes in float64 as the reference does, so they agree to rounding.
	q, g = values_and_grad(orthonormalize, x, w)
	rq, rg = values_and_grad(orthonormalize_reference, x, w)
	assert q.dtype == torch.float64 and q.shape == (e, n, d)
	torch.testing.assert_close(q, rq, rtol=1e-9, atol=1e-9)
	torch.testing.assert_close(g, rg, rtol=1e-7, atol=1e-7)
	if n == 0:
		return
	# float32: the op is at least as close to the float64 result as the float32 reference is (square
	# random rows, D = E, can be ill-conditioned, which makes both miss by more than a fixed tolerance).
	q32, g32 = values_and_grad(orthonormalize, x.float(), w.float())
	rq32, rg32 = values_and_grad(orthonormalize_reference, x.float(), w.float())
	assert q32.dtype == torch.float32
	assert rel_err(q32, rq) <= 2 * rel_err(rq32, rq) + 1e-6
	assert rel_err(g32, rg) <= 2 * rel_err(rg32, rg) + 1e-5


def test_float32_matches_the_reference_closely_on_well_conditioned_rows():
	torch.manual_seed(0)
	x = torch.randn(8, 256, 512) * 5
	w = torch.randn_like(x)
	q, g = values_and_grad(orthonormalize, x, w)
	rq, rg = values_and_grad(orthonormalize_reference, x.double(), w.double())
	torch.testing.assert_close(q, rq.float(), rtol=0, atol=2e-6)
	torch.testing.assert_close(g, rg.float(), rtol=1e-4, atol=1e-5)


def degenerate_rows(dtype):
	"""[5, 6, 32]: row 0 a zero vector, 1 a duplicate, 2 a multiple, 3 all zeros, 4 a vector in the span
	of earlier ones, 5 near-parallel below the floor (residual 1e-7 scale, clamped) and near-parallel
	above it (residual 1e-3 scale)."""
	torch.manual_seed(0)
	x = torch.randn(5, 7, 32, dtype=dtype)
	x[1, 0] = 0
	x[2, 1] = x[0, 1]
	x[3, 2] = -2.5 * x[1, 2]
	x[:, 3] = 0
	x[4, 4] = x[0, 4] - 0.5 * x[2, 4]
	x[1, 5] = x[0, 5] + 1e-7 * torch.randn(32, dtype=dtype)
	x[2, 6] = x[1, 6] + 1e-3 * torch.randn(32, dtype=dtype)
	return x


def test_degenerate_rows_match_the_reference_in_float64():
	# In float64 the residual of a dependent vector is rounding noise of 1e-16 scale, so noise / eps
	# agrees between op and reference to well within the tolerance: the clamped branch is compared too.
	x = degenerate_rows(torch.float64)
	w = torch.randn_like(x)
	q, g = values_and_grad(orthonormalize, x, w)
	rq, rg = values_and_grad(orthonormalize_reference, x, w)
	torch.testing.assert_close(q, rq, rtol=1e-9, atol=1e-9)
	torch.testing.assert_close(g, rg, rtol=1e-6, atol=1e-6)


def test_degenerate_rows_in_float32_keep_the_documented_behaviour():
	x = degenerate_rows(torch.float32) * 10
	w = torch.randn_like(x)
	q, g = values_and_grad(orthonormalize, x, w)
	rq, _ = values_and_grad(orthonormalize_reference, x, w)
	assert torch.isfinite(q).all() and torch.isfinite(g).all()
	# Zero inputs give exactly zero outputs, as in the reference.
	assert torch.equal(q[1, 0], torch.zeros(32)) and torch.equal(q[:, 3], torch.zeros(5, 32))
	# Vectors up to the first degenerate one of a row are the reference's; the degenerate ones come out
	# short (residual / eps) and orthogonal to the earlier outputs.
	for i, row in [(2, 1), (3, 2), (4, 4), (1, 5)]:
		torch.testing.assert_close(q[:i, row], rq[:i, row], rtol=0, atol=1e-5)
		assert q[i, row].norm() < 0.5
		assert (q[:i, row] @ q[i, row]).abs().max() < 1e-5
	# Near-parallel above the floor: orthonormalised like the reference.
	torch.testing.assert_close(q[:, 6], rq[:, 6], rtol=0, atol=1e-3)
	torch.testing.assert_close(q[:, 6] @ q[:, 6].T, torch.eye(5), rtol=0, atol=2e-4)


def test_half_precision_is_computed_in_float32_and_returned_in_its_dtype():
	torch.manual_seed(0)
	x = torch.randn(4, 16, 32).bfloat16().requires_grad_(True)
	q = orthonormalize(x)
	assert q.dtype == torch.bfloat16
	torch.testing.assert_close(q, orthonormalize_reference(x.detach()), rtol=0, atol=1e-2)
	q.float().sum().backward()
	assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()


def test_non_contiguous_features():
	torch.manual_seed(0)
	x = torch.randn(3, 12, 40)[:, ::2, ::3]
	torch.testing.assert_close(orthonormalize(x), orthonormalize_reference(x), rtol=0, atol=1e-5)


def test_the_entry_point_runs_the_op_and_its_cpp_autograd():
	x = torch.randn(4, 10, 12, requires_grad=True)
	q = orthonormalize(x)
	assert "OrthonormalizeFunction" in q.grad_fn.name()
	with torch.no_grad():
		assert orthonormalize(x).grad_fn is None


@pytest.mark.parametrize("args,name", [
	((torch.randn(4, 8), 1e-4), "features"),
	((torch.ones(2, 3, 4, dtype=torch.int64), 1e-4), "features"),
	((torch.randn(9, 4, 8), 1e-4), "E=9"),
	((torch.randn(2, 3, 4), 0.0), "eps"),
	((torch.randn(2, 3, 4), 1e-30), "eps"),    # eps**2 is 0 in float32
	((torch.randn(2, 3, 4), float("inf")), "eps"),
])
def test_the_op_checks_its_arguments(args, name):
	with pytest.raises(ValueError, match=name):
		torch.ops.tdmpc2_moe.orthonormalize(*args)


@pytest.mark.parametrize("grad,name", [
	(torch.randn(2, 3, 5), "grad"),
	(torch.ones(2, 3, 4, dtype=torch.int64), "grad"),
	(torch.randn(2, 3, 4, device="meta"), "grad"),
])
def test_the_backward_op_checks_its_arguments(grad, name):
	with pytest.raises(ValueError, match=name):
		torch.ops.tdmpc2_moe.orthonormalize_backward(grad, torch.randn(2, 3, 4), 1e-4)


def test_opcheck():
	torch.manual_seed(0)
	for dtype in (torch.float32, torch.float64):
		x = torch.randn(4, 9, 16, dtype=dtype, requires_grad=True)
		torch.library.opcheck(torch.ops.tdmpc2_moe.orthonormalize.default, (x, 1e-4))
		torch.library.opcheck(torch.ops.tdmpc2_moe.orthonormalize_backward.default,
							  (torch.randn_like(x), x.detach(), 1e-4))
	torch.library.opcheck(torch.ops.tdmpc2_moe.orthonormalize.default, (torch.randn(3, 0, 5), 1e-4))


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_compiles_fullgraph(compile_backend):
	torch._dynamo.reset()
	torch.manual_seed(0)
	x = torch.randn(4, 33, 24, requires_grad=True)
	w = torch.randn(4, 33, 24)

	def loss(x):
		return (ops.orthonormalize(x * 2) * w).sum()
	compiled = torch.compile(loss, fullgraph=True, backend=compile_backend)
	(g,) = torch.autograd.grad(compiled(x), x)
	(eg,) = torch.autograd.grad(loss(x), x)
	torch.testing.assert_close(g, eg)


def test_results_do_not_depend_on_the_number_of_threads():
	torch.manual_seed(0)
	x = torch.randn(8, 300, 64, requires_grad=True)
	w = torch.randn_like(x)
	threads = torch.get_num_threads()
	try:
		results = []
		for n in (1, 2):
			torch.set_num_threads(n)
			results.append(values_and_grad(orthonormalize, x, w))
	finally:
		torch.set_num_threads(threads)
	assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.skipif(backend() != "cuda", reason="needs the CUDA kernels and a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("e,n,d", [(1, 3, 1), (2, 0, 5), (4, 7, 17), (8, 300, 64), (8, 1000, 512), (3, 5, 300)])
def test_cuda_kernels_match_the_cpu_kernels(e, n, d, dtype):
	torch.manual_seed(0)
	x = torch.randn(e, n, d, dtype=dtype)
	if n > 2:
		x[min(1, e - 1), 2] = 0   # a zero vector (clamped)
	w = torch.randn_like(x)
	q, g = values_and_grad(orthonormalize, x, w)
	cq, cg = values_and_grad(orthonormalize, x.cuda(), w.cuda())
	tol = 1e-9 if dtype == torch.float64 else 1e-5
	torch.testing.assert_close(cq.cpu(), q, rtol=tol, atol=tol)
	torch.testing.assert_close(cg.cpu(), g, rtol=100 * tol, atol=100 * tol)
	torch.library.opcheck(torch.ops.tdmpc2_moe.orthonormalize.default, (x.cuda().requires_grad_(True), 1e-4))
