"""ops.orthonormalize: Gram-Schmidt of the expert features per row, against a QR decomposition (values
and gradients), orthonormality, degenerate inputs, argument errors."""
import pytest
import torch

from tdmpc2_moe.ops.operators import backend, orthonormalize
from tdmpc2_moe.ops.reference import orthonormalize_reference


def qr_oracle(x):
	"""Gram-Schmidt in expert order written as the QR decomposition of each row's [D, E] matrix, with
	the signs chosen so that R has a positive diagonal (which makes the two the same map)."""
	q, r = torch.linalg.qr(x.permute(1, 2, 0))
	sign = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
	return (q * sign).permute(2, 0, 1)


def gram(q):
	"""Returns the per-row Gram matrices [N, E, E] of q [E, N, D]."""
	return torch.einsum("end,fnd->nef", q, q)


@pytest.mark.parametrize("e,n,d", [(1, 5, 3), (4, 33, 16), (8, 17, 8), (5, 1, 512)])
def test_values_and_gradients_match_qr_in_float64(e, n, d):
	torch.manual_seed(0)
	x = torch.randn(e, n, d, dtype=torch.float64, requires_grad=True)
	w = torch.randn(e, n, d, dtype=torch.float64)
	out = orthonormalize(x)
	(out * w).sum().backward()
	grad, x.grad = x.grad.clone(), None
	ref = qr_oracle(x)
	(ref * w).sum().backward()
	torch.testing.assert_close(out, ref)
	torch.testing.assert_close(grad, x.grad)


def test_float32_rows_are_orthonormal_and_first_vector_keeps_its_direction():
	torch.manual_seed(0)
	x = torch.randn(8, 256, 512) * 20
	q = orthonormalize(x)
	assert q.dtype == torch.float32 and q.shape == x.shape
	torch.testing.assert_close(gram(q), torch.eye(8).expand(256, 8, 8), atol=1e-5, rtol=0)
	torch.testing.assert_close(q[0], x[0] / x[0].norm(dim=-1, keepdim=True))
	# Gram-Schmidt in expert order: expert i's output is orthogonal to every earlier expert's input.
	for i in range(1, 8):
		cos = (q[i].unsqueeze(0) * x[:i]).sum(-1) / x[:i].norm(dim=-1)
		assert cos.abs().max() < 1e-5


def test_gradcheck():
	torch.manual_seed(0)
	x = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
	assert torch.autograd.gradcheck(orthonormalize, (x,))


def test_half_precision_is_computed_in_float32_and_returned_in_its_dtype():
	torch.manual_seed(0)
	x = torch.randn(4, 16, 32)
	q = orthonormalize(x.bfloat16())
	assert q.dtype == torch.bfloat16
	torch.testing.assert_close(q.float(), orthonormalize(x.bfloat16().float()), atol=1e-2, rtol=0)


def test_degenerate_vectors_give_finite_values_and_gradients():
	torch.manual_seed(0)
	x = torch.randn(5, 6, 32) * 10
	x[1, 0] = 0                                  # a zero expert vector
	x[2, 1] = 3 * x[0, 1]                        # exactly parallel to an earlier one
	x[3, 2] = x[1, 2] + 1e-7 * torch.randn(32)   # parallel up to float32 noise
	x[:, 3] = 0                                  # a whole row of zeros
	x[4, 4] = x[0, 4] + x[2, 4]                  # in the span of earlier ones
	x.requires_grad_(True)
	q = orthonormalize(x)
	(q * torch.randn_like(q)).sum().backward()
	assert torch.isfinite(q).all() and torch.isfinite(x.grad).all()
	assert x.grad.abs().max() <= 1e5
	# Zero inputs give zero outputs; dependent vectors come out short and orthogonal to the earlier ones.
	assert torch.equal(q[1, 0], torch.zeros(32)) and torch.equal(q[:, 3], torch.zeros(5, 32))
	for i, row in [(2, 1), (3, 2), (4, 4)]:
		assert q[i, row].norm() < 0.5
		assert (q[:i, row] @ q[i, row]).abs().max() < 1e-5
	# The other rows and the vectors before the degenerate one stay orthonormal.
	g = gram(q.detach())
	torch.testing.assert_close(g[5], torch.eye(5), atol=1e-5, rtol=0)
	torch.testing.assert_close(g[1, :2, :2], torch.eye(2), atol=1e-5, rtol=0)


def test_near_parallel_vectors_above_the_floor_are_orthonormalised():
	torch.manual_seed(0)
	base = torch.randn(1, 64, 128)
	x = torch.cat([base, base + 1e-2 * torch.randn(1, 64, 128), torch.randn(2, 64, 128)])
	g = gram(orthonormalize(x))
	torch.testing.assert_close(g, torch.eye(4).expand(64, 4, 4), atol=2e-4, rtol=0)


def test_empty_inputs():
	assert orthonormalize(torch.randn(4, 0, 8)).shape == (4, 0, 8)
	assert orthonormalize(torch.randn(0, 3, 8)).shape == (0, 3, 8)


def test_ops_entry_point_runs_the_op_or_the_reference():
	# The compiled op when the extension is built (tests/ops/test_orthonormalize_op.py compares the two in
	# detail), the reference itself otherwise.
	torch.manual_seed(0)
	x = torch.randn(4, 10, 12)
	x[1, 3] = 1e-4 * x[1, 3]   # a residual below eps=1e-3: clamped in both
	got, want = orthonormalize(x, eps=1e-3), orthonormalize_reference(x, 1e-3)
	if backend() == "reference":
		assert torch.equal(got, want)
	else:
		torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("args,kwargs,names", [
	((torch.randn(9, 4, 8),), {}, ["E=9", "D=8"]),
	((torch.randn(4, 8),), {}, ["features"]),
	((torch.ones(2, 3, 4, dtype=torch.int64),), {}, ["features"]),
	(([[1.0]],), {}, ["features"]),
	((torch.randn(2, 3, 4),), {"eps": 0.0}, ["eps"]),
	((torch.randn(2, 3, 4),), {"eps": float("nan")}, ["eps"]),
])
def test_bad_arguments_raise_value_errors_naming_them(args, kwargs, names):
	with pytest.raises(ValueError) as err:
		orthonormalize(*args, **kwargs)
	for name in names:
		assert name in str(err.value)
