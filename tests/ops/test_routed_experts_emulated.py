"""
The routed experts' CUDA kernels (csrc/cuda/routed_experts_kernels.cu) and their binding
(routed_experts_binding_impl.h) run on the CPU through the SIMT emulator HIP-CPU (tests/ops/emulator, the
.cu compiled unchanged by g++; docs/gpu.md says what this covers and what only a GPU can show): the
device-side counting sort, the grouped GEMMs on their worst-case grids, the row kernels, the fixed-order
backward reductions.

- The grid of tests/ops/test_routed_experts_op.py (no rows, one row, idle experts, every row to one expert,
  k = 1..E, repeated experts, non-contiguous input; Mish, SimNorm and plain layers; float32 and float64):
  values and gradients against the CPU op and the reference, `saved` against the CPU kernel's (the
  grouping exactly), the inference forward bit-identical to the training one.
- Indices outside [0, E), which the CUDA path cannot check without a host sync: NaN rows, nothing else
  touched.
- A racecheck-like pass: bit-identical outputs under permuted, sequential and concurrent block orders and
  permuted thread orders; planted bugs in the weight gradient (a missing tile barrier, float atomics) are
  caught by the same comparison.
- tests/ops/test_routed_experts_op.py itself in a subprocess whose CPU kernels are the emulated CUDA
  kernels (emulated_kernels_plugin.py).

Needs $HIP_CPU_ROOT (a HIP-CPU checkout) and TBB; skipped with a reason saying how to provide them.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tdmpc2_moe.ops import operators as ops
from tdmpc2_moe.ops.reference import routed_experts_reference

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "emulator"))
import simt_emulator  # noqa: E402  (tests/ops/emulator/simt_emulator.py)
from simt_emulator import DEFAULT_SCHEDULE as DEFAULT, SCHEDULES, check_block_starts  # noqa: E402
from conftest import REPO, TESTS  # noqa: E402
from test_routed_experts_op import ROUTINGS, SIMNORM, STACKS, case_inputs, make_params, rel_err, routing  # noqa: E402

pytestmark = simt_emulator.module_marks()

emu = simt_emulator.emu_fixture()


def codes(activations):
	return [ops._ACTIVATION_CODES[a] for a in activations]


def run_op(lib, x, idx, w, params, activations, grad_out, group=SIMNORM):
	"""Runs one library's (the emulated or the CPU) training forward, inference forward and backward.
	Returns (out, saved, inference out, [grad_x, grad_weights, *grad_params], grads without input_grad)."""
	c = codes(activations)
	out, saved = lib.routed_experts_train(x, idx, w, params, c, group)
	inference = lib.routed_experts(x, idx, w, params, c, group)
	grad_x, grad_w, grad_params = lib.routed_experts_backward(grad_out, x, idx, w, params, saved, c, group, True)
	no_x = lib.routed_experts_backward(grad_out, x, idx, w, params, saved, c, group, False)
	return out, list(saved), inference, [grad_x, grad_w, *grad_params], [no_x[0], no_x[1], *no_x[2]]


def reference(x, idx, w, params, activations, grad_out):
	"""The reference's output and its gradients in x, w and every parameter (autograd)."""
	leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, *params)]
	out = routed_experts_reference(leaves[0], idx, leaves[1], leaves[2:], activations, SIMNORM)
	grads = torch.autograd.grad((out * grad_out).sum(), leaves, allow_unused=True)
	return [out.detach()] + [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]


@pytest.mark.parametrize("stack", list(STACKS))
@pytest.mark.parametrize("n, e, k, kind", ROUTINGS, ids=[f"n{n}-e{e}-k{k}-{kind}" for n, e, k, kind in ROUTINGS])
def test_values_gradients_and_saved_match_the_cpu_op_and_the_reference(emu, stack, n, e, k, kind):
	cpu = torch.ops.tdmpc2_moe
	want64 = None
	for dtype in (torch.float64, torch.float32):
		activations, x, idx, w, params, grad_out = case_inputs(stack, n, e, k, kind, dtype)
		out, saved, inference, grads, no_x = run_op(emu, x, idx, w, params, activations, grad_out)
		c_out, c_saved, _, c_grads, _ = run_op(cpu, x, idx, w, params, activations, grad_out)
		# The inference forward runs the same kernels on workspace buffers: the same bits.
		assert torch.equal(inference, out)
		# Without input_grad: grad_x is [0], the rest the same bits.
		assert no_x[0].shape == (0,) and all(torch.equal(a, b) for a, b in zip(no_x[1:], grads[1:]))
		# saved as the CPU kernel lays it out (routed_experts.h): the grouping (perm, pos, offsets) exactly.
		assert len(saved) == len(c_saved) and torch.equal(saved[0], c_saved[0])
		assert [t.shape for t in saved] == [t.shape for t in c_saved] and all(t.is_contiguous() for t in saved)
		assert out.shape == (n, STACKS[stack][1][-1]) and out.dtype == dtype
		assert grads[1].dtype == w.dtype and all(a.shape == b.shape for a, b in zip(grads, c_grads))
		if dtype == torch.float64:
			want64 = reference(x, idx, w, params, activations, grad_out)
			for a, b in zip(saved[1:], c_saved[1:]):
				torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
			for a, b, r in zip([out, *grads], [c_out, *c_grads], want64):
				torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
				torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)
		elif n > 0:
			# float32 against the float64 reference: the kernels sum in other orders than the float64
			# reference and the CPU op (GEMMs one accumulator in ascending k, LayerNorm by warp butterflies),
			# so no bits are shared; each result must lie within twice the float32 reference's own distance
			# from float64 (the same operations in float32, in torch's orders) plus 1e-6 relative, a few
			# float32 ulps for results whose float32 reference happens to be almost exact (the bound of
			# tests/ops/test_routed_experts_op.py).
			ref32 = reference(x, idx, w, params, activations, grad_out)
			for a, c_a, r, b in zip([out, *grads], [c_out, *c_grads], ref32, want64):
				assert rel_err(a, b) <= 2 * rel_err(r, b) + 1e-6
				assert rel_err(c_a, b) <= 2 * rel_err(r, b) + 1e-6


def test_mish_and_simnorm_are_right_at_the_extremes(emu):
	# As the CPU op's test: large pre-activations (Mish linear from 20, SimNorm's max subtracted), very
	# negative ones (exp underflow) and a constant row (LayerNorm of zero variance).
	activations, dims = ["mish", "simnorm"], [3, 8, 8]
	params = make_params(activations, dims, 2, torch.float32, torch.Generator().manual_seed(5))
	params[0].mul_(40)
	x = torch.tensor([[1.0, -2.0, 3.0], [0.0, 0.0, 0.0], [50.0, -80.0, 9.0]])
	params[0][:, 0] = 0.0
	idx, w = torch.tensor([[0, 1], [1, 0], [0, 1]]), torch.rand(3, 2)
	got = emu.routed_experts(x, idx, w, params, codes(activations), SIMNORM)
	want = routed_experts_reference(x, idx, w, params, activations, SIMNORM)
	torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_indices_outside_the_experts_give_nan_rows_and_touch_nothing_else(emu):
	# The CUDA path cannot check the indices without reading them on the host (a sync): a slot with an
	# index outside [0, E) joins no expert (sorted after offsets[E]) and makes its row's output, input
	# gradient and its own routing-weight gradient NaN; everything else is as if that slot had weight 0.
	activations, dims = STACKS["dynamics"]
	e, n, k = 4, 9, 2
	g = torch.Generator().manual_seed(12)
	x = torch.randn(n, dims[0], generator=g, dtype=torch.float64)
	idx, w = routing("distinct", n, e, k, g)
	w = w.double()
	params = make_params(activations, dims, e, torch.float64, g)
	grad_out = torch.randn(n, dims[-1], generator=g, dtype=torch.float64)
	bad_slots = [(2, 1), (5, 0)]
	bad_idx, zero_w = idx.clone(), w.clone()
	for r, j in bad_slots:
		bad_idx[r, j] = (e, -1)[r == 5]
		zero_w[r, j] = 0.0
	out, saved, _, grads, _ = run_op(emu, x, bad_idx, w, params, activations, grad_out)
	s = n * k
	perm, pos, offsets = saved[0][:s], saved[0][s:2 * s], saved[0][2 * s:]
	assert torch.equal(perm.sort().values, torch.arange(s)) and torch.equal(perm[pos], torch.arange(s))
	assert offsets[-1].item() == s - 2 and perm[s - 2:].tolist() == [2 * k + 1, 5 * k]
	bad, good = torch.tensor([2, 5]), torch.tensor([r for r in range(n) if r not in (2, 5)])
	assert out[bad].isnan().all() and grads[0][bad].isnan().all()
	assert grads[1][2, 1].isnan() and grads[1][5, 0].isnan() and grads[1][2, 0].isfinite() and grads[1][5, 1].isfinite()
	want = reference(x, idx, zero_w, params, activations, grad_out)
	torch.testing.assert_close(out[good], want[0][good], rtol=1e-10, atol=1e-12)
	torch.testing.assert_close(grads[0][good], want[1][good], rtol=1e-10, atol=1e-12)
	torch.testing.assert_close(grads[1][good], want[2][good], rtol=1e-10, atol=1e-12)
	torch.testing.assert_close(grads[1][2, 0], want[2][2, 0], rtol=1e-10, atol=1e-12)
	for a, b in zip(grads[2:], want[3:]):
		torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# --- racecheck-like: execution orders ---------------------------------------------------------------

# (rows, experts, k, widths, activations): several sort blocks (S > 2048 slots), experts of several row
# tiles with a partial last one, several column tiles (widths over 32), an idle expert, SimNorm groups.
ORDER_CASES = [
	(1500, 5, 2, [40, 48, 33], ["mish", "none"]),
	(700, 6, 3, [24, 64, 32], ["mish", "simnorm"]),
	(90, 8, 8, [11, 16, 5], ["simnorm", "none"]),
]


def _order_inputs(n, e, k, dims, activations, dtype):
	g = torch.Generator().manual_seed(n + e)
	x = torch.randn(n, dims[0], generator=g, dtype=torch.float64)
	# Expert e - 1 left without rows when k < e - 1.
	idx = torch.stack([torch.randperm(max(k, e - 1), generator=g)[:k] for _ in range(n)])
	w = torch.rand(n, k, generator=g, dtype=torch.float64)
	params = make_params(activations, dims, e, torch.float64, g)
	grad_out = torch.randn(n, dims[-1], generator=g, dtype=torch.float64)
	return x.to(dtype), idx, w.to(dtype), [p.to(dtype) for p in params], grad_out.to(dtype)


def _flat(result):
	out, saved, inference, grads, no_x = result
	return [out, *saved, inference, *grads, *no_x]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n, e, k, dims, activations", ORDER_CASES,
						 ids=[f"n{c[0]}-e{c[1]}-k{c[2]}" for c in ORDER_CASES])
def test_outputs_are_bit_identical_in_every_block_and_thread_order(emu, n, e, k, dims, activations, dtype):
	x, idx, w, params, grad_out = _order_inputs(n, e, k, dims, activations, dtype)
	emu.set_schedule(*DEFAULT)  # concurrent blocks (TBB threads), identity orders
	want = _flat(run_op(emu, x, idx, w, params, activations, grad_out, group=4))
	cpu = run_op(torch.ops.tdmpc2_moe, x, idx, w, params, activations, grad_out, group=4)
	assert torch.equal(want[1], cpu[1][0])  # the grouping, exactly the CPU's
	tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
	torch.testing.assert_close(want[0], cpu[0], **tol)
	for a, b in zip(want[-2 * len(cpu[3]):-len(cpu[3])], cpu[3]):
		torch.testing.assert_close(a, b, **tol)
	for schedule in SCHEDULES:
		emu.set_schedule(*schedule)
		got = _flat(run_op(emu, x, idx, w, params, activations, grad_out, group=4))
		starts = emu.block_starts().tolist()
		for i, (a, b) in enumerate(zip(got, want)):
			assert torch.equal(a, b), f"output {i} differs under schedule {schedule}"
		# Sequential: the last launch's blocks ran one after the other in the permutation's order.
		check_block_starts(schedule, starts)
	emu.set_schedule(*DEFAULT)


SHIPPED, MISSING_LOAD_BARRIER, FLOAT_ATOMICS = 0, 1, 2


def test_the_order_pass_catches_planted_bugs_in_the_weight_gradient(emu):
	# The backward's weight gradient as shipped and with a planted bug (tests/ops/emulator/
	# routed_experts_kernels.cpp: the shipped kernel without the barrier after its tile loads, and a
	# float-atomics reduction), on the grouping and rows of a real training forward: the comparison of
	# orders that the shipped kernels pass above tells the wrong ones apart.
	n, e, k, dims, activations = 300, 3, 2, [40, 36], ["none"]
	g = torch.Generator().manual_seed(4)
	x = torch.randn(n, dims[0], generator=g) * torch.logspace(-2, 2, dims[0])
	idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)])
	params = make_params(activations, dims, e, torch.float32, g)
	_, saved = torch.ops.tdmpc2_moe.routed_experts_train(x, idx, torch.rand(n, k, generator=g), params, [0], 1)
	s = n * k
	offsets, h = saved[0][2 * s:], saved[1]
	grad = torch.randn(s, dims[1], generator=g) * torch.logspace(-3, 3, s)[:, None]
	want = torch.stack([grad[offsets[j]:offsets[j + 1]].double().T @ h[offsets[j]:offsets[j + 1]].double()
						for j in range(e)])
	results = {variant: [] for variant in (SHIPPED, MISSING_LOAD_BARRIER, FLOAT_ATOMICS)}
	for schedule in [DEFAULT, *SCHEDULES]:
		emu.set_schedule(*schedule)
		for variant, got in results.items():
			got.append(emu.expert_weight_grad(variant, grad, h, offsets))
	emu.set_schedule(*DEFAULT)
	shipped = results[SHIPPED]
	assert all(torch.equal(shipped[0], r) for r in shipped[1:])
	assert rel_err(shipped[0], want) < 1e-5
	for variant in (MISSING_LOAD_BARRIER, FLOAT_ATOMICS):
		got = results[variant]
		assert any(not torch.equal(got[0], r) for r in got[1:]), f"planted bug {variant} went unnoticed"


# --- the device-parametrised op suite, through the emulated kernels -----------------------------------


# Node ids are relative to the rootdir (the repository: pyproject.toml).
SUITE = (HERE / "test_routed_experts_op.py").relative_to(REPO).as_posix()


def test_the_op_suite_passes_with_the_emulated_kernels():
	# tests/ops/test_routed_experts_op.py with the CPU kernels of tdmpc2_moe's routed experts replaced by the
	# emulated CUDA kernels (and the self-check on first use running them). One case is left out: indices
	# outside [0, E) raise ValueError on the CPU only (above: NaN rows on the CUDA path); the run must say
	# "1 deselected", so a renamed case fails here instead of running.
	env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(HERE / "emulator"), os.environ.get("PYTHONPATH")])))
	done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not integration",
						   "-p", "emulated_kernels_plugin", "ops/test_routed_experts_op.py",
						   "--deselect", f"{SUITE}::test_the_op_checks_its_arguments[<lambda>-indices2]"],
						  cwd=TESTS, capture_output=True, text=True, env=env, timeout=900)
	tail = done.stdout[-4000:] + done.stderr[-2000:]
	assert done.returncode == 0, tail
	ran = dict(re.findall(r"(\w+) (\d+)", re.search(r"emulated CUDA kernels ran: (.*)", done.stdout).group(1)))
	assert all(int(ran[name]) > 0 for name in ("routed_experts", "routed_experts_train", "routed_experts_backward")), tail
	assert re.search(r"\d+ passed, (\d+ skipped, )?1 deselected", done.stdout), tail
