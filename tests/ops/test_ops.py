"""topk_gate (compiled CPU kernels) against the plain-PyTorch reference: values, gradients, opcheck, compile."""
import math

import pytest
import torch

from tdmpc2_moe import GateHistory, backend, topk_gate
from tdmpc2_moe.ops.reference import topk_gate_backward_reference, topk_gate_reference

pytestmark = pytest.mark.skipif(backend() == "reference", reason="tdmpc2_moe._C is not built")


def _cases():
	"""Covers every N, E, k in {1, 2, E//2, E}, temperature, renormalize, dtype and layout, without the full product."""
	cases = []
	i = 0
	for e in (1, 2, 3, 4, 8, 13, 64, 257, 1024):
		for k in sorted({1, 2, max(e // 2, 1), e} & set(range(1, e + 1))):
			for shift in (0, 2):
				j = i + shift
				ns = (0, 1, 7, 513, 4099) if e <= 64 else (0, 1, 7, 513)
				cases.append(dict(n=ns[j % len(ns)], e=e, k=k, temperature=(0.3, 1.0, 3.0)[j % 3],
								  renormalize=j % 2 == 0, dtype=(torch.float32, torch.bfloat16, torch.float32, torch.float16)[(j // 3) % 4],
								  layout=("contiguous", "transposed", "strided")[j % 3]))
			i += 1
	return cases


def _logits(n, e, dtype=torch.float32, layout="contiguous", scale=2.0):
	"""Random logits [n, e]; "transposed" and "strided" give non-contiguous views of the same values."""
	if layout == "transposed":
		x = (torch.randn(e, n) * scale).t()
	elif layout == "strided":
		x = (torch.randn(n, 2 * e) * scale)[:, ::2]
	else:
		x = torch.randn(n, e) * scale
	return x.to(dtype)


def _assert_same_routing(gate, ref, logits, temperature):
	"""Indices equal the reference's, except between experts whose probabilities tie to float rounding."""
	n, k = ref.indices.shape
	e = logits.shape[1]
	assert gate.indices.dtype == torch.int64 and gate.indices.shape == (n, k)
	assert ((gate.indices >= 0) & (gate.indices < e)).all()
	probs = torch.softmax(logits.float() / temperature, -1)
	near_tie = (probs.gather(1, gate.indices) - probs.gather(1, ref.indices)).abs() <= 1e-6
	assert ((gate.indices == ref.indices) | near_tie).all()


@pytest.mark.parametrize("case", _cases(), ids=lambda c: "n{n}-e{e}-k{k}-t{temperature}-r{renormalize:d}-{layout}-{dtype}".format(**c).replace("torch.", ""))
def test_matches_reference(case, on_device):
	torch.manual_seed(hash(str(case)) % 2**31)
	n, e, k, t, renorm = case["n"], case["e"], case["k"], case["temperature"], case["renormalize"]
	logits = _logits(n, e, case["dtype"], case["layout"]).requires_grad_()
	gate = topk_gate(logits, k, temperature=t, renormalize=renorm)
	ref = topk_gate_reference(logits.detach(), k, t, renorm)
	_assert_same_routing(gate, ref, logits.detach(), t)
	for name in ("weights", "expert_prob_mean", "lse"):
		got, want = getattr(gate, name), getattr(ref, name)
		assert got.dtype == torch.float32 and got.shape == want.shape
		torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)
	counts = torch.bincount(gate.indices.reshape(-1), minlength=e).float()
	torch.testing.assert_close(gate.expert_frac, counts / (max(n, 1) * k))
	assert not gate.expert_frac.requires_grad and not gate.indices.requires_grad

	# Gradient from all three differentiable outputs, with random cotangents, against the hand-written
	# reference backward (given the kernel's own selection) and, where the selections agree, autograd.
	cw, cp, cl = torch.randn(n, k), torch.randn(e), torch.randn(n)
	(grad,) = torch.autograd.grad((gate.weights * cw).sum() + (gate.expert_prob_mean * cp).sum() + (gate.lse * cl).sum(), logits)
	assert grad.dtype == logits.dtype and grad.shape == logits.shape
	want = topk_gate_backward_reference(cw, cp, cl, logits.detach(), gate.indices, k, t, renorm)
	tol = dict(rtol=1e-4, atol=1e-5) if case["dtype"] == torch.float32 else dict(rtol=2e-2, atol=1e-2)
	torch.testing.assert_close(grad, want, **tol)
	if torch.equal(gate.indices, ref.indices):
		ref_logits = logits.detach().clone().requires_grad_()
		r = topk_gate_reference(ref_logits, k, t, renorm)
		(ref_grad,) = torch.autograd.grad((r.weights * cw).sum() + (r.expert_prob_mean * cp).sum() + (r.lse * cl).sum(), ref_logits)
		torch.testing.assert_close(grad, ref_grad, **tol)


def test_ties_go_to_the_lower_index(on_device):
	logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 3.0, 3.0, 3.0], [2.0, 1.0, 2.0, 2.0]])
	gate = topk_gate(logits, 3)
	assert gate.indices.tolist() == [[0, 1, 2], [1, 2, 3], [0, 2, 3]]
	torch.testing.assert_close(gate.weights[0], torch.full((3,), 1 / 3))


def test_unused_outputs_need_no_gradient(on_device):
	logits = torch.randn(33, 6, requires_grad=True)
	gate = topk_gate(logits, 2, temperature=0.7)
	(grad,) = torch.autograd.grad(gate.lse.sum(), logits)
	torch.testing.assert_close(grad, torch.softmax(logits.detach() / 0.7, -1) / 0.7)


def test_reference_gradcheck_float64():
	torch.manual_seed(0)
	for renorm in (True, False):
		x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)

		def f(x):
			g = topk_gate_reference(x, 2, 0.5, renorm)
			return g.weights, g.expert_prob_mean, g.lse

		assert torch.autograd.gradcheck(f, (x,))


@pytest.mark.parametrize("e", [5, 64])
def test_compiled_backward_matches_float64_reference(e, on_device):
	torch.manual_seed(e)
	x = torch.randn(9, e, dtype=torch.float64)
	gate = topk_gate(x.float().requires_grad_(), 3, temperature=1.5)
	cots = torch.randn(9, 3, dtype=torch.float64), torch.randn(e, dtype=torch.float64), torch.randn(9, dtype=torch.float64)
	xf = x.float().requires_grad_()
	g = topk_gate(xf, 3, temperature=1.5)
	(grad,) = torch.autograd.grad(sum((o * c.float()).sum() for o, c in zip((g.weights, g.expert_prob_mean, g.lse), cots)), xf)
	x64 = x.clone().requires_grad_()
	r = topk_gate_reference(x64, 3, 1.5, True)
	assert torch.equal(r.indices, gate.indices)
	(want,) = torch.autograd.grad(sum((o * c).sum() for o, c in zip((r.weights, r.expert_prob_mean, r.lse), cots)), x64)
	torch.testing.assert_close(grad.double(), want, rtol=1e-4, atol=1e-6)


def test_opcheck_every_op(on_device):
	torch.manual_seed(0)
	x = torch.randn(11, 6, requires_grad=True)
	ops = torch.ops.tdmpc2_moe
	torch.library.opcheck(ops.topk_gate.default, (x, 2, 0.8, True))
	torch.library.opcheck(ops.topk_gate.default, (x.detach().bfloat16(), 3, 1.0, False))
	history = GateHistory(8, 6)
	torch.library.opcheck(ops.topk_gate_record.default, (x, 2, 1.0, True, history.ring, history.cursor))
	idx = topk_gate(x.detach(), 2).indices
	args = (torch.randn(11, 2), torch.randn(6), torch.randn(11), x.detach(), idx, 1.0, True)
	torch.library.opcheck(ops.topk_gate_backward.default, args)
	torch.library.opcheck(ops.topk_gate_backward.default, (None, None, torch.randn(11), x.detach(), idx, 2.0, False))


def _routing(x, history=None):
	g = topk_gate(x, 2, temperature=0.9, history=history)
	return g.weights, g.indices, (g.weights.sum() + g.expert_prob_mean.pow(2).sum() + g.lse.mean())


@pytest.mark.parametrize("compile_backend", ["eager", "inductor"])
def test_compiles_fullgraph_with_and_without_history(compile_backend, on_device):
	torch._dynamo.reset()
	torch.manual_seed(0)
	x = torch.randn(40, 8, requires_grad=True)
	compiled_plain = torch.compile(lambda x: _routing(x), fullgraph=True, backend=compile_backend)
	w, i, loss = compiled_plain(x)
	ew, ei, eloss = _routing(x)
	assert torch.equal(i, ei)
	torch.testing.assert_close(w, ew)
	(g,) = torch.autograd.grad(loss, x)
	(eg,) = torch.autograd.grad(eloss, x)
	torch.testing.assert_close(g, eg)

	history, eager_history = GateHistory(64, 8), GateHistory(64, 8)
	compiled_rec = torch.compile(_routing, fullgraph=True, backend=compile_backend)
	for _ in range(3):  # 120 rows: wraps the 64-row ring
		w, _, loss = compiled_rec(x, history)
		loss.backward()
		_routing(x, eager_history)
	assert history.total == eager_history.total == 120
	torch.testing.assert_close(history.snapshot(), eager_history.snapshot())


@pytest.mark.parametrize("with_history", [False, True])
def test_compile_traces_one_op_with_its_cpp_autograd(with_history, on_device):
	# One registration: dynamo sees each call as one node of the schema itself, and the schema's
	# Autograd kernel is the C++ one (no Python autograd registration, no second schema).
	torch._dynamo.reset()
	graphs = []

	def capture(gm, example_inputs):
		graphs.append(gm)
		return gm.forward
	x = torch.randn(16, 8, requires_grad=True)
	history = GateHistory(8, 8) if with_history else None
	torch.compile(lambda x: _routing(x, history), fullgraph=True, backend=capture)(x)[2].backward()
	(gm,) = graphs
	targets = [str(n.target) for n in gm.graph.nodes if "tdmpc2_moe" in str(n.target)]
	assert targets == ["tdmpc2_moe.topk_gate_record.default" if with_history else "tdmpc2_moe.topk_gate.default"]
	for name in ("topk_gate", "topk_gate_record"):
		assert torch._C._dispatch_has_kernel_for_dispatch_key(f"tdmpc2_moe::{name}", "Autograd")
	assert not [n for n in dir(torch.ops.tdmpc2_moe) if n.endswith("_eager")]
	assert x.grad is not None and x.grad.isfinite().all()


@pytest.mark.parametrize("bad, match", [
	(dict(k=0), "k"), (dict(k=9), "k"), (dict(k=2.0), "k"),
	(dict(temperature=0.0), "temperature"), (dict(temperature=-1.0), "temperature"),
	(dict(temperature=math.nan), "temperature"), (dict(temperature=math.inf), "temperature"),
	(dict(logits=torch.randn(8)), "logits"), (dict(logits=torch.randn(2, 3, 8)), "logits"),
	(dict(logits=torch.ones(4, 8, dtype=torch.int64)), "logits"),
	(dict(history=GateHistory(4, 5)), "history"), (dict(history=GateHistory(4, 8, device="meta")), "history"),
])
def test_bad_arguments_raise_value_error_naming_them(bad, match):
	args = dict(logits=torch.randn(4, 8), k=2, temperature=1.0, history=None)
	args.update(bad)
	with pytest.raises(ValueError, match=match):
		topk_gate(args["logits"], args["k"], temperature=args["temperature"], history=args["history"])


def _bad_rows(e):
	nan, inf = math.nan, math.inf
	rows = [[nan] * e, [inf] * e, [-inf] * e, [nan] + [0.0] * (e - 1), [0.0] * (e - 1) + [inf],
			[-inf] * (e - 1) + [nan], [1.0] + [-inf] * (e - 1)]
	return torch.tensor(rows)


@pytest.mark.parametrize("e", [3, 8, 40])
def test_nan_and_inf_rows_route_to_valid_experts_and_stay_inside_the_ring(e, on_device):
	logits = _bad_rows(e)
	n, k = logits.shape[0], min(2, e)
	gate = topk_gate(logits, k)
	assert ((gate.indices >= 0) & (gate.indices < e)).all()
	assert all(len(set(row)) == k for row in gate.indices.tolist())

	# The ring is the middle of a larger sentinel-filled tensor: no write may land outside it,
	# including when one call has more rows than the ring (N > capacity) and the cursor is mid-ring.
	capacity = 4
	storage = torch.full((capacity + 2, e), 7.0)
	ring, cursor = storage[1:-1], torch.tensor(3)
	torch.ops.tdmpc2_moe.topk_gate_record(logits, k, 1.0, True, ring, cursor)
	assert (storage[0] == 7.0).all() and (storage[-1] == 7.0).all()
	assert cursor.item() == 3 + n

	# A single bad row in a GateHistory changes exactly its own ring row.
	history = GateHistory(6, e)
	topk_gate(torch.randn(2, e), k, history=history)
	before = history.ring.clone()
	topk_gate(logits[:1], k, history=history)
	changed = (history.ring != before) & ~(history.ring.isnan() & before.isnan())
	assert changed.any(dim=1).nonzero().flatten().tolist() == [2]
	assert history.total == 3


def test_backend_names_the_compiled_kernels_in_use(monkeypatch):
	# "cuda" on a CUDA build with a GPU (the suite is the GPU's acceptance test), "cpu" otherwise.
	from tdmpc2_moe import _C
	from tdmpc2_moe.ops import operators as ops
	assert backend() == ("cuda" if _C.WITH_CUDA and torch.cuda.is_available() else "cpu")
	monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
	monkeypatch.setattr(_C, "WITH_CUDA", True, raising=False)
	assert ops.backend() == "cuda"
	monkeypatch.setattr(_C, "WITH_CUDA", False)
	assert ops.backend() == "cpu"


def _cpu_kernel(op, *args):
	"""Calls the CPU kernel of `op` whatever devices its arguments are on (as the dispatcher would pick the
	CUDA kernel for CUDA logits with CPU indices): its own checks must refuse a tensor on another device."""
	return op.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args)


@pytest.mark.parametrize("bad", ["indices", "grad_weights", "grad_prob_mean", "grad_lse"])
def test_backward_refuses_every_tensor_on_another_device(bad):
	x = torch.randn(6, 5)
	args = dict(grad_weights=torch.randn(6, 2), grad_prob_mean=torch.randn(5), grad_lse=torch.randn(6), logits=x,
				indices=topk_gate(x, 2).indices)
	args[bad] = args[bad].to("meta")
	bwd = torch.ops.tdmpc2_moe.topk_gate_backward.default
	values = (*args.values(), 1.0, True)
	with pytest.raises(ValueError, match=bad):
		_cpu_kernel(bwd, *values)
	with pytest.raises(ValueError, match=bad):  # dispatched to the fake (meta) kernel
		bwd(*values)


@pytest.mark.parametrize("bad", ["grad_weights", "grad_prob_mean", "grad_lse"])
def test_backward_refuses_integer_gradients(bad):
	x = torch.randn(6, 5)
	args = dict(grad_weights=torch.randn(6, 2), grad_prob_mean=torch.randn(5), grad_lse=torch.randn(6), logits=x,
				indices=topk_gate(x, 2).indices)
	args[bad] = args[bad].long()
	with pytest.raises(ValueError, match=bad):
		torch.ops.tdmpc2_moe.topk_gate_backward(*args.values(), 1.0, True)


@pytest.mark.parametrize("bad", ["ring", "cursor"])
def test_record_refuses_ring_or_cursor_on_another_device(bad):
	args = dict(ring=torch.zeros(4, 5), cursor=torch.zeros((), dtype=torch.int64))
	args[bad] = args[bad].to("meta")
	op = torch.ops.tdmpc2_moe.topk_gate_record.default
	with pytest.raises(ValueError, match=bad):
		_cpu_kernel(op, torch.randn(3, 5), 2, 1.0, True, args["ring"], args["cursor"])
	with pytest.raises(ValueError, match=bad):
		op(torch.randn(3, 5), 2, 1.0, True, args["ring"], args["cursor"])


@pytest.mark.parametrize("temperature", [1e-46, 1e39, 3.5e38])
def test_temperature_must_survive_float32(temperature, on_device):
	# Finite and positive as a double, but 0 or inf as the float32 the kernels divide by.
	x = torch.randn(4, 8)
	with pytest.raises(ValueError, match="temperature"):
		topk_gate(x, 2, temperature=temperature)
	for op in (torch.ops.tdmpc2_moe.topk_gate, _cpu_kernel):
		with pytest.raises(ValueError, match="temperature"):
			if op is _cpu_kernel:
				op(torch.ops.tdmpc2_moe.topk_gate.default, x, 2, temperature, True)
			else:
				op(x, 2, temperature, True)
	assert topk_gate(x, 2, temperature=1e-30).weights.isfinite().all()


@pytest.mark.parametrize("e", [1, 3, 8, 17, 40])
def test_lse_of_non_finite_rows_equals_the_reference(e, on_device):
	nan, inf = math.nan, math.inf
	rows = [[-inf] * e, [inf] * e, [0.0] * (e - 1) + [inf], [-inf] * (e - 1) + [inf], [nan] * e,
			[-inf] * (e - 1) + [nan], [inf] + [nan] * (e - 1), [1.0] + [-inf] * (e - 1), [2.0] * e]
	logits = torch.tensor(rows)
	want = topk_gate_reference(logits, 1).lse
	for t in (1.0, 0.5):
		got = topk_gate(logits, 1, temperature=t).lse
		want = topk_gate_reference(logits, 1, t).lse
		torch.testing.assert_close(got, want, equal_nan=True)


def _registered(logits, k, temperature, renormalize, history=None):
	"""Calls the registered op directly (as traced code does); returns its 5 outputs."""
	ops = torch.ops.tdmpc2_moe
	if history is None:
		return ops.topk_gate(logits, k, temperature, renormalize)
	return ops.topk_gate_record(logits, k, temperature, renormalize, history.ring, history.cursor)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_history", [False, True])
def test_eager_cpp_autograd_equals_registered_op(dtype, with_history, on_device):
	# topk_gate and the registered op it wraps must give exactly the same values, gradients and ring
	# writes (one autograd path), whichever outputs the loss uses.
	torch.manual_seed(1)
	x = (torch.randn(70, 8) * 2).to(dtype)
	cw, cp, cl = torch.randn(70, 3), torch.randn(8), torch.randn(70)
	eager_hist, reg_hist = (GateHistory(32, 8), GateHistory(32, 8)) if with_history else (None, None)
	for used in ((0, 2, 4), (4,), (0,)):
		a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
		got = topk_gate(a, 3, temperature=0.7, renormalize=False, history=eager_hist)
		want = _registered(b, 3, 0.7, False, reg_hist)
		for g, w in zip(got, want):
			assert torch.equal(g, w) and g.requires_grad == w.requires_grad
		cots = {0: cw, 2: cp, 4: cl}
		(ga,) = torch.autograd.grad(sum((got[i] * cots[i]).sum() for i in used), a)
		(gb,) = torch.autograd.grad(sum((want[i] * cots[i]).sum() for i in used), b)
		assert ga.dtype == dtype and torch.equal(ga, gb)
	if with_history:
		assert eager_hist.total == reg_hist.total == 210
		assert torch.equal(eager_hist.ring, reg_hist.ring)


def test_eager_gradient_matches_reference_with_history(on_device):
	torch.manual_seed(2)
	x = torch.randn(50, 6, requires_grad=True)
	history = GateHistory(16, 6)
	gate = topk_gate(x, 2, temperature=1.3, history=history)
	(grad,) = torch.autograd.grad(gate.weights.sum() + gate.expert_prob_mean.square().sum() + gate.lse.sum(), x)
	xr = x.detach().clone().requires_grad_()
	ref = topk_gate_reference(xr, 2, 1.3, True)
	assert torch.equal(gate.indices, ref.indices)
	(want,) = torch.autograd.grad(ref.weights.sum() + ref.expert_prob_mean.square().sum() + ref.lse.sum(), xr)
	torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-6)
	dense = torch.zeros(50, 6).scatter_(1, ref.indices, ref.weights.detach())
	torch.testing.assert_close(history.snapshot(), dense[-16:].cpu())
	assert history.total == 50


def test_eager_without_grad_builds_no_graph(on_device):
	x = torch.randn(20, 5, requires_grad=True)
	history = GateHistory(8, 5)
	with torch.no_grad():
		gates = [topk_gate(x, 2), topk_gate(x, 2, history=history)]
	gates.append(topk_gate(x.detach(), 2, history=history))
	for gate in gates:
		assert all(t.grad_fn is None and not t.requires_grad for t in gate)
	assert history.total == 40
	with torch.inference_mode():
		assert topk_gate(torch.randn(4, 5), 2).weights.is_inference()


def test_backward_reads_expanded_and_strided_gradients_in_place(on_device):
	# The CPU kernel reads grad_weights and grad_lse at their strides (autograd passes expanded ones).
	torch.manual_seed(3)
	x = torch.randn(37, 9)
	idx = topk_gate(x, 3).indices
	bwd = torch.ops.tdmpc2_moe.topk_gate_backward
	gw, gp, gl = torch.randn(37, 3), torch.randn(9), torch.randn(37)
	for renorm in (True, False):
		want = bwd(gw, gp, gl, x, idx, 0.8, renorm)
		got = bwd(gw.t().contiguous().t(), gp, torch.stack([gl, gl], 1)[:, 1], x, idx, 0.8, renorm)
		torch.testing.assert_close(got, want, rtol=0, atol=0)
		ones = bwd(torch.ones(37, 3), gp, torch.ones(37), x, idx, 0.8, renorm)
		expanded = bwd(torch.ones(()).expand(37, 3), gp, torch.ones(1).expand(37), x, idx, 0.8, renorm)
		torch.testing.assert_close(expanded, ones, rtol=0, atol=0)


def test_statistics_are_bit_identical_whatever_the_thread_count():
	# Fixed-order reduction: expert_prob_mean is summed over fixed row chunks in chunk order, so the
	# number of threads (the CPU's launch configuration) does not change a bit of it.
	torch.manual_seed(4)
	x = torch.randn(20011, 24) * 3
	threads = torch.get_num_threads()
	try:
		results = []
		for t in (1, 2, 3):
			torch.set_num_threads(t)
			results.append(topk_gate(x, 2).expert_prob_mean)
			results.append(topk_gate(x, 2).expert_prob_mean)
	finally:
		torch.set_num_threads(threads)
	assert all(torch.equal(results[0], r) for r in results[1:])
