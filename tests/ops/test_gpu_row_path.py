"""
The CUDA kernels' row code (csrc/gate_row.h: the thread-per-row path for E <= 32, the team path for
E > 32), compiled for the host behind the test-only ops tdmpc2_moe_test::gpu_rows_forward / _backward
(tests/ops/csrc/gpu_rows_host.cpp, built here with torch.utils.cpp_extension against the repository's
csrc/ headers; users' extensions do not carry them) and checked against the reference: the GPU's
selection, softmax, statistics, ring write and backward
logic, tested on a machine without a GPU. (The block reductions and the cross-block statistics run in
the emulated .cu kernels of tests/ops/test_cuda_emulated.py; device expf only on a GPU: tests/ops/test_cuda.py.)
"""
import math
from pathlib import Path

import pytest
import torch

from tdmpc2_moe import backend, topk_gate
from tdmpc2_moe.ops.reference import dense_routing, topk_gate_backward_reference, topk_gate_reference
from conftest import REPO

pytestmark = pytest.mark.skipif(backend() == "reference", reason="tdmpc2_moe._C is not built")
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module", autouse=True)
def gpu_rows_ops():
	"""Builds and loads the test-only ops (once per machine; torch caches the build) and returns their namespace."""
	from torch.utils.cpp_extension import load
	load(name="tdmpc2_moe_test_gpu_rows", sources=[str(HERE / "csrc" / "gpu_rows_host.cpp")],
		 extra_include_paths=[str(REPO / "csrc")], extra_cflags=["-O2"], is_python_module=False)
	return torch.ops.tdmpc2_moe_test

SMALL_E = list(range(1, 41))
LARGE_E = [63, 64, 65, 127, 128, 129, 255, 256, 257, 511, 512, 513, 1000, 1023, 1024]


def _ks(e):
	"""Every k for E <= 40; 1, 2, E/2, E-1 and E beyond."""
	return range(1, e + 1) if e <= 40 else sorted({1, 2, e // 2, e - 1, e})


def _forward(logits, k, temperature, renormalize, ring_dtype=torch.float32, capacity=5, cursor=3):
	ring = torch.zeros(capacity, logits.shape[1], dtype=ring_dtype)
	cur = torch.tensor(cursor)
	out = torch.ops.tdmpc2_moe_test.gpu_rows_forward(logits, k, temperature, renormalize, ring, cur)
	return out, ring, cur


def _logits(n, e, seed, dtype=torch.float32):
	"""Random logits with exact ties: half the rows hold values from a handful of levels."""
	g = torch.Generator().manual_seed(seed)
	x = torch.randn(n, e, generator=g) * 2
	x[::2] = torch.randint(-2, 3, (len(range(0, n, 2)), e), generator=g).float()
	return x.to(dtype)


def _check(logits, k, t, renorm, ring_dtype=torch.float32):
	(w, idx, pm, frac, lse), ring, cur = _forward(logits, k, t, renorm, ring_dtype)
	n, e = logits.shape
	ref = topk_gate_reference(logits, k, t, renorm)
	probs = torch.softmax(logits.float() / t, -1)
	assert ((idx >= 0) & (idx < e)).all()
	near_tie = (probs.gather(1, idx) - probs.gather(1, ref.indices)).abs() <= 1e-6
	assert ((idx == ref.indices) | near_tie).all()
	torch.testing.assert_close(w, ref.weights, rtol=1e-5, atol=1e-6)
	torch.testing.assert_close(pm, ref.expert_prob_mean, rtol=1e-5, atol=1e-6)
	torch.testing.assert_close(lse, ref.lse, rtol=1e-5, atol=1e-6)
	torch.testing.assert_close(frac, torch.bincount(idx.reshape(-1), minlength=e).float() / (max(n, 1) * k))
	# Ring: rows written from slot 3 on, wrapping a ring of 5; only the last 5 rows of the call survive.
	want = torch.zeros(5, e, dtype=ring_dtype)
	dense = dense_routing(w, idx, e).to(ring_dtype)
	for r in range(max(0, n - 5), n):
		want[(3 + r) % 5] = dense[r]
	assert torch.equal(ring, want) and cur.item() == 3 + n
	g = torch.Generator().manual_seed(n * 1031 + e)
	cw, cp, cl = torch.randn(n, k, generator=g), torch.randn(e, generator=g), torch.randn(n, generator=g)
	grad = torch.ops.tdmpc2_moe_test.gpu_rows_backward(cw, cp, cl, logits, idx, t, renorm)
	want_grad = topk_gate_backward_reference(cw, cp, cl, logits, idx, k, t, renorm)
	tol = dict(rtol=1e-4, atol=1e-5) if logits.dtype == torch.float32 else dict(rtol=2e-2, atol=1e-2)
	torch.testing.assert_close(grad, want_grad, **tol)


@pytest.mark.parametrize("e", SMALL_E + LARGE_E)
def test_row_path_matches_reference_for_every_k(e):
	n = 7 if e <= 256 else 3
	logits = _logits(n, e, seed=e)
	for i, k in enumerate(_ks(e)):
		_check(logits, k, (0.5, 1.0, 2.5)[i % 3], i % 2 == 0)


@pytest.mark.parametrize("e", [3, 8, 16, 32, 33, 200])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_row_path_dtypes(e, dtype):
	logits = _logits(6, e, seed=e + 1, dtype=dtype)
	_check(logits, min(2, e), 1.0, True, ring_dtype=dtype)


@pytest.mark.parametrize("e", [1, 2, 5, 8, 31, 32, 33, 64, 1024])
def test_row_path_non_finite_rows(e):
	nan, inf = math.nan, math.inf
	rows = [[nan] * e, [inf] * e, [-inf] * e, [nan] + [0.0] * (e - 1), [0.0] * (e - 1) + [inf],
			[-inf] * (e - 1) + [nan], [1.0] + [-inf] * (e - 1), [-inf] * (e - 1) + [inf]]
	logits = torch.tensor(rows)
	k = min(2, e)
	# The ring sits between two sentinel rows: no write may land outside it.
	storage = torch.full((6, e), 7.0)
	ring, cur = storage[1:-1], torch.tensor(3)
	w, idx, pm, frac, lse = torch.ops.tdmpc2_moe_test.gpu_rows_forward(logits, k, 1.0, True, ring, cur)
	assert (storage[0] == 7.0).all() and (storage[-1] == 7.0).all() and cur.item() == 3 + len(rows)
	assert ((idx >= 0) & (idx < e)).all()
	assert all(len(set(r)) == k for r in idx.tolist())
	torch.testing.assert_close(lse, topk_gate_reference(logits, k).lse, equal_nan=True)
	# The same rows through the CPU kernels: same routing, same lse.
	gate = topk_gate(logits, k)
	assert torch.equal(gate.indices, idx)
	torch.testing.assert_close(gate.lse, lse, equal_nan=True)


@pytest.mark.parametrize("e", [6, 40])
def test_backward_ignores_indices_outside_int32_as_the_cpu_kernel_does(e):
	# 2^32 + 1 narrowed to int would read and write expert 1; both backends must ignore the pick.
	torch.manual_seed(e)
	x = torch.randn(5, e)
	idx = topk_gate(x, 2).indices
	bad = idx.clone()
	bad[:, 1] = 2**32 + 1
	gw, gp, gl = torch.randn(5, 2), torch.randn(e), torch.randn(5)
	rows = torch.ops.tdmpc2_moe_test.gpu_rows_backward(gw, gp, gl, x, bad, 1.0, True)
	lanes = torch.ops.tdmpc2_moe.topk_gate_backward(gw, gp, gl, x, bad, 1.0, True)
	torch.testing.assert_close(rows, lanes, rtol=1e-5, atol=1e-6)
	narrowed = bad.clone()
	narrowed[:, 1] = 1
	assert not torch.allclose(rows, torch.ops.tdmpc2_moe.topk_gate_backward(gw, gp, gl, x, narrowed, 1.0, True))


def test_row_path_without_rows_or_gradients():
	x = torch.empty(0, 40)
	(w, idx, pm, frac, lse), ring, cur = _forward(x, 3, 1.0, True)
	assert w.shape == (0, 3) and (pm == 0).all() and (frac == 0).all() and cur.item() == 3
	x = torch.randn(4, 12)
	idx = topk_gate(x, 2).indices
	for e_logits in (x, torch.randn(4, 50)):
		idx = topk_gate(e_logits, 2).indices
		got = torch.ops.tdmpc2_moe_test.gpu_rows_backward(None, None, torch.ones(4), e_logits, idx, 1.0, False)
		torch.testing.assert_close(got, torch.softmax(e_logits, -1))
