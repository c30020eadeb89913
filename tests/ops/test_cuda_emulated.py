"""
The shipped CUDA kernels (csrc/cuda/topk_gate.cu, ortho_kernels.cu) run on the CPU through the SIMT
emulator HIP-CPU (tests/ops/emulator: test-only build, the .cu compiled unchanged by g++; docs/gpu.md says
what this covers and what only a GPU can show). Unlike tests/ops/test_gpu_row_path.py, which runs the
kernels' per-row functions on the host, this runs the kernels themselves: launch geometry, the warp and
block reductions of the block-per-row path, the statistics' cross-block ticket reduction, the ticket
memset, grid-stride loops, shared memory, the ring write.

- The op grid against tdmpc2_moe.ops.reference (E <= 32 thread-per-row and E > 32 block-per-row, every k
  class, ties, non-finite rows, ring wrap, bf16/f16, N = 0, forward and backward, orthonormalize).
- A racecheck-like pass: the same inputs under many block orders (sequential in a permuted order, and
  concurrent on several OS threads) and thread orders must give bit-identical outputs, since every
  reduction is in a fixed order; negative controls (wrong kernels on the same emulator) show the pass
  would catch a missing barrier, float atomics and barrier divergence.
- The device-parametrised op suites (test_ops.py, test_orthonormalize_op.py, test_history.py) in a
  subprocess whose CPU kernels are the emulated CUDA kernels (tests/ops/emulator/emulated_kernels_plugin.py).

Needs $HIP_CPU_ROOT (a HIP-CPU checkout) and TBB; skipped with a reason saying how to provide them.
"""
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tdmpc2_moe import topk_gate
from tdmpc2_moe.ops.reference import (orthonormalize_reference, record_reference, topk_gate_backward_reference,
								  topk_gate_reference)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "emulator"))
import simt_emulator  # noqa: E402  (tests/ops/emulator/simt_emulator.py)
from simt_emulator import DEFAULT_SCHEDULE as DEFAULT, SCHEDULES, check_block_starts  # noqa: E402
from conftest import TESTS

pytestmark = simt_emulator.module_marks()



emu = simt_emulator.emu_fixture()


def _logits(n, e, seed, dtype=torch.float32, scale=2.0):
	"""Random logits with exact ties: every other row holds values from five integer levels."""
	g = torch.Generator().manual_seed(seed)
	x = torch.randn(n, e, generator=g) * scale
	x[::2] = torch.randint(-2, 3, (len(range(0, n, 2)), e), generator=g).float()
	return x.to(dtype)


def _assert_same_routing(indices, ref_indices, logits, temperature):
	"""Indices equal the reference's, except between experts whose probabilities tie to float rounding."""
	e = logits.shape[1]
	assert ((indices >= 0) & (indices < e)).all()
	probs = torch.softmax(logits.float() / temperature, -1)
	near_tie = (probs.gather(1, indices) - probs.gather(1, ref_indices)).abs() <= 1e-6
	assert ((indices == ref_indices) | near_tie).all()


def _ring_equal(got, want):
	"""Bitwise equal, except that any NaN equals any NaN (CUDA's and torch's NaN payloads differ)."""
	nan = got.isnan()
	return torch.equal(nan, want.isnan()) and torch.equal(got[~nan], want[~nan])


def _gate_cases():
	"""E across both kernel paths and every bucket edge; k in {1, 2, E//2, E-1, E}; N, temperature,
	renormalize, logits dtype, ring dtype and ring capacity cycled so every value meets both paths."""
	cases, i = [], 0
	for e in (1, 2, 3, 4, 5, 8, 9, 13, 16, 17, 31, 32, 33, 40, 64, 65, 100, 255, 257, 1000, 1024):
		for k in sorted({1, 2, e // 2, e - 1, e} & set(range(1, e + 1))):
			ns = (0, 1, 7, 130, 1000) if e <= 32 else (0, 1, 7, 40)
			cases.append(dict(n=ns[i % len(ns)], e=e, k=k, t=(0.3, 1.0, 3.0)[i % 3], renorm=i % 2 == 0,
							  dtype=(torch.float32, torch.bfloat16, torch.float16)[i % 3 if i % 4 else 0],
							  ring=(torch.float32, torch.bfloat16, torch.float16, None)[i % 4],
							  capacity=(5, 64)[i // 2 % 2]))
			i += 1
	return cases


def _case_id(c):
	ring = str(c["ring"]).replace("torch.", "") + f"x{c['capacity']}" if c["ring"] is not None else "noring"
	return f"n{c['n']}-e{c['e']}-k{c['k']}-t{c['t']}-r{c['renorm']:d}-{str(c['dtype']).replace('torch.', '')}-{ring}"


@pytest.mark.parametrize("case", _gate_cases(), ids=_case_id)
def test_gate_kernels_match_the_reference(emu, case):
	n, e, k, t, renorm = case["n"], case["e"], case["k"], case["t"], case["renorm"]
	logits = _logits(n, e, seed=n * 7919 + e * 31 + k, dtype=case["dtype"])
	if case["ring"] is None:
		w, idx, pm, frac, lse = emu.topk_gate(logits, k, t, renorm)
	else:
		# The ring sits between two sentinel rows: no write may land outside it. Cursor mid-ring; with
		# capacity 5 most calls wrap it, and with N > 5 only the last 5 rows may be written.
		storage = torch.full((case["capacity"] + 2, e), 7.0).to(case["ring"])
		ring, cursor = storage[1:-1], torch.tensor(3)
		w, idx, pm, frac, lse = emu.topk_gate_record(logits, k, t, renorm, ring, cursor)
		assert (storage[0] == 7).all() and (storage[-1] == 7).all() and cursor.item() == 3 + n
		want_ring, want_cursor = torch.full_like(ring, 7.0), torch.tensor(3)
		record_reference(want_ring, want_cursor, w, idx)
		assert _ring_equal(ring, want_ring)
	ref = topk_gate_reference(logits, k, t, renorm)
	assert w.shape == (n, k) and idx.shape == (n, k) and pm.shape == frac.shape == (e,) and lse.shape == (n,)
	_assert_same_routing(idx, ref.indices, logits, t)
	torch.testing.assert_close(w, ref.weights, rtol=1e-5, atol=1e-6)
	torch.testing.assert_close(pm, ref.expert_prob_mean, rtol=1e-5, atol=1e-6)
	torch.testing.assert_close(lse, ref.lse, rtol=1e-5, atol=1e-6)
	torch.testing.assert_close(frac, torch.bincount(idx.reshape(-1), minlength=e).float() / (max(n, 1) * k))

	g = torch.Generator().manual_seed(n + e)
	cw, cp, cl = torch.randn(n, k, generator=g), torch.randn(e, generator=g), torch.randn(n, generator=g)
	tol = dict(rtol=1e-4, atol=1e-5) if case["dtype"] == torch.float32 else dict(rtol=2e-2, atol=1e-2)
	grad = emu.topk_gate_backward(cw, cp, cl, logits, idx, t, renorm)
	assert grad.dtype == logits.dtype and grad.shape == logits.shape
	torch.testing.assert_close(grad, topk_gate_backward_reference(cw, cp, cl, logits, idx, k, t, renorm), **tol)
	# Absent gradients (the kernels read zeros for them).
	only_lse = emu.topk_gate_backward(None, None, cl, logits, idx, t, renorm)
	zeros_w, zeros_p = torch.zeros(n, k), torch.zeros(e)
	torch.testing.assert_close(only_lse, topk_gate_backward_reference(zeros_w, zeros_p, cl, logits, idx, k, t, renorm),
							   **tol)


def _bad_rows(e):
	nan, inf = math.nan, math.inf
	return torch.tensor([[nan] * e, [inf] * e, [-inf] * e, [nan] + [0.0] * (e - 1), [0.0] * (e - 1) + [inf],
						 [-inf] * (e - 1) + [nan], [1.0] + [-inf] * (e - 1), [-inf] * (e - 1) + [inf], [2.0] * e])


@pytest.mark.parametrize("e", [1, 3, 8, 32, 33, 64, 1024])
def test_non_finite_rows_route_to_valid_experts_inside_the_ring(emu, e):
	logits = _bad_rows(e)
	n, k = logits.shape[0], min(2, e)
	storage = torch.full((6, e), 7.0)
	ring, cursor = storage[1:-1], torch.tensor(3)
	w, idx, pm, frac, lse = emu.topk_gate_record(logits, k, 1.0, True, ring, cursor)
	assert (storage[0] == 7.0).all() and (storage[-1] == 7.0).all() and cursor.item() == 3 + n
	assert ((idx >= 0) & (idx < e)).all() and all(len(set(r)) == k for r in idx.tolist())
	torch.testing.assert_close(lse, topk_gate_reference(logits, k).lse, equal_nan=True)
	# The same routing and lse as the CPU kernels give.
	cpu = topk_gate(logits, k)
	assert torch.equal(cpu.indices, idx)
	torch.testing.assert_close(cpu.lse, lse, equal_nan=True)
	grad = emu.topk_gate_backward(torch.ones(n, k), torch.ones(e), torch.ones(n), logits, idx, 1.0, True)
	assert grad.shape == (n, e) and grad[-1].isfinite().all()


@pytest.mark.parametrize("e", [8, 40])
def test_no_rows(emu, e):
	ring, cursor = torch.full((4, e), 7.0), torch.tensor(2)
	w, idx, pm, frac, lse = emu.topk_gate_record(torch.empty(0, e), 2, 1.0, True, ring, cursor)
	assert w.shape == (0, 2) and idx.shape == (0, 2) and lse.shape == (0,)
	assert (pm == 0).all() and (frac == 0).all() and (ring == 7.0).all() and cursor.item() == 2
	grad = emu.topk_gate_backward(torch.empty(0, 2), torch.ones(e), torch.empty(0), torch.empty(0, e), idx, 1.0, True)
	assert grad.shape == (0, e)


def _ortho_values_and_grad(fn, x, w):
	x = x.detach().clone().requires_grad_(True)
	out = fn(x)
	(grad,) = torch.autograd.grad((out * w).sum(), x)
	return out.detach(), grad


@pytest.mark.parametrize("e, n, d", [(1, 1, 1), (1, 3, 40), (2, 7, 17), (4, 5, 64), (8, 3, 8), (8, 9, 300),
									  (16, 2, 33), (54, 1, 60)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_orthonormalize_kernels_match_the_reference(emu, e, n, d, dtype):
	torch.manual_seed(e * 100 + n * 10 + d)
	x = torch.randn(e, n, d, dtype=torch.float64)
	if e >= 3 and dtype == torch.float64:
		# A dependent vector: its residual is floored at eps (the clamped branch). Only in float64: in
		# float32 that residual is rounding noise amplified 1/eps times, whatever the summation order.
		x[2] = x[0]
	g = torch.randn_like(x)
	eps = 1e-4
	q = emu.orthonormalize(x.to(dtype), eps)
	grad = emu.orthonormalize_backward(g.to(dtype), x.to(dtype), eps)
	rq, rg = _ortho_values_and_grad(lambda v: orthonormalize_reference(v, eps), x, g)
	assert q.dtype == grad.dtype == dtype and q.shape == grad.shape == x.shape
	if dtype == torch.float64:
		torch.testing.assert_close(q, rq, rtol=1e-9, atol=1e-9)
		torch.testing.assert_close(grad, rg, rtol=1e-7, atol=1e-7)
	else:
		# float32 within twice the float32 reference's own distance from float64 (as test_orthonormalize_op).
		rq32, rg32 = _ortho_values_and_grad(lambda v: orthonormalize_reference(v, eps), x.float(), g.float())

		def rel(a, b):
			return ((a.double() - b).norm() / b.norm().clamp(min=1e-30)).item()
		assert rel(q, rq) <= 2 * rel(rq32, rq) + 1e-6
		assert rel(grad, rg) <= 2 * rel(rg32, rg) + 1e-5


def test_orthonormalize_without_rows(emu):
	x = torch.empty(4, 0, 16)
	assert emu.orthonormalize(x, 1e-4).shape == x.shape
	assert emu.orthonormalize_backward(x, x, 1e-4).shape == x.shape


# --- racecheck-like: execution orders ---------------------------------------------------------------

def _gate_outputs(emu, logits, k, capacity):
	"""Every output of a recording forward (ring and cursor included) and of the backward, as one list."""
	n, e = logits.shape
	ring, cursor = torch.zeros(capacity, e), torch.tensor(capacity // 3)
	fwd = emu.topk_gate_record(logits, k, 0.9, True, ring, cursor)
	starts = emu.block_starts()
	g = torch.Generator().manual_seed(5)
	grad = emu.topk_gate_backward(torch.randn(n, k, generator=g), torch.randn(e, generator=g),
								  torch.randn(n, generator=g), logits, fwd[1], 0.9, True)
	return [*fwd, ring, cursor, grad], starts


# (rows, experts, k, forward blocks): thread-per-row (128 rows a block) and block-per-row (a row a block),
# each also with more rows than the grid's cap (2048 and 1024 blocks: grid-stride loops).
ORDER_CASES = [(128 * 37 + 5, 8, 2, 38), (128 * 2048 + 77, 4, 1, 2048), (301, 40, 3, 301), (1100, 33, 5, 1024),
			   (24, 1024, 8, 24)]


@pytest.mark.parametrize("n, e, k, blocks", ORDER_CASES, ids=[f"n{c[0]}-e{c[1]}" for c in ORDER_CASES])
def test_outputs_are_bit_identical_in_every_block_and_thread_order(emu, n, e, k, blocks):
	logits = torch.randn(n, e, generator=torch.Generator().manual_seed(n)) * 3
	emu.set_schedule(*DEFAULT)  # concurrent blocks (TBB threads), identity orders
	want, _ = _gate_outputs(emu, logits, k, capacity=97)
	ref = topk_gate_reference(logits, k, 0.9, True)
	torch.testing.assert_close(want[2], ref.expert_prob_mean, rtol=1e-5, atol=1e-6)
	assert torch.equal(want[1], ref.indices)
	# The grid-stride cases (more rows than blocks) are the slowest; three orders still move the
	# ticket's last block.
	grid_stride = n > (128 if e <= 32 else 1) * blocks
	schedules = SCHEDULES[:3] if grid_stride else SCHEDULES
	last_blocks = set()
	for schedule in schedules:
		emu.set_schedule(*schedule)
		got, starts = _gate_outputs(emu, logits, k, capacity=97)
		for name, a, b in zip(("weights", "indices", "prob_mean", "frac", "lse", "ring", "cursor", "grad"), got, want):
			assert torch.equal(a, b), f"{name} differs under schedule {schedule}"
		# Sequential: the forward's blocks ran one after the other in the permutation's order.
		check_block_starts(schedule, starts.tolist())
		if schedule[3]:
			assert len(starts) == blocks
			last_blocks.add(starts[-1].item())
	if blocks > 1:
		# The block that finds the ticket last, and sums every block's partials, changed between orders.
		assert len(last_blocks) >= 3


def test_the_order_pass_catches_a_missing_barrier_and_float_atomics(emu):
	# Negative controls (tests/ops/emulator/negative_controls.cpp): the same comparison of orders that the
	# kernels pass above tells these wrong kernels apart from right ones.
	x = torch.randn(64 * 40, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 3, 64 * 40)
	results = {}
	for schedule in SCHEDULES:
		emu.set_schedule(*schedule)
		results[schedule] = (emu.negative_control(0, x), emu.negative_control(1, x)[0])
	emu.set_schedule(*DEFAULT)
	barrier = [r[0] for r in results.values()]
	assert any(not torch.equal(barrier[0], b) for b in barrier[1:]), "the missing barrier went unnoticed"
	sums = [r[1] for r in results.values()]
	assert any(not torch.equal(sums[0], s) for s in sums[1:]), "the order-dependent float atomics went unnoticed"


def test_barrier_divergence_is_an_error_not_a_wrong_answer():
	# In a subprocess: a divergent launch leaves the emulator's fibers mid-kernel in that process.
	code = textwrap.dedent(f"""
		import sys, torch
		sys.path.insert(0, {str(HERE / "emulator")!r})
		import simt_emulator
		emu = simt_emulator.load()
		try:
			emu.negative_control(2, torch.zeros(64 * 4))
		except RuntimeError as exc:
			print("RAISED", exc)
	""")
	done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
	assert "RAISED" in done.stdout and "barrier divergence" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]


# --- the device-parametrised op suites, through the emulated kernels -----------------------------------

SUITES = ["ops/test_ops.py", "ops/test_orthonormalize_op.py", "block/test_history.py"]


def test_op_suites_pass_with_the_emulated_kernels():
	env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(HERE / "emulator"), os.environ.get("PYTHONPATH")])))
	done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not integration",
						   "-p", "emulated_kernels_plugin", *SUITES], cwd=TESTS, capture_output=True, text=True,
						  env=env, timeout=900)
	tail = done.stdout[-4000:] + done.stderr[-2000:]
	assert done.returncode == 0, tail
	ran = dict(re.findall(r"(\w+) (\d+)", re.search(r"emulated CUDA kernels ran: (.*)", done.stdout).group(1)))
	assert all(int(count) > 0 for count in ran.values()) and len(ran) == 8, tail
	assert re.search(r"\d+ passed", done.stdout), tail
