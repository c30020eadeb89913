"""
CUDA-only behaviour of topk_gate and GateHistory: device checks with real CUDA tensors, bit-identical
statistics, streams other than the default, CUDA-graph capture and replay of forward + history +
backward, the ring under torch.compile (written in place, never cloned per call), and the adaptive
temperature under torch.compile's CUDA graphs (mode="reduce-overhead"). Skipped, with
the reason, where there is no GPU or the extension has no CUDA kernels; scripts/gpu_check.sh runs them.
"""
import pytest
import torch

from conftest import CUDA_SKIP_REASON
from tdmpc2_moe import GateHistory, topk_gate
from tdmpc2_moe.ops.reference import dense_routing, topk_gate_reference

pytestmark = pytest.mark.skipif(CUDA_SKIP_REASON is not None, reason=CUDA_SKIP_REASON or "")


def _loss(gate):
	return gate.weights.square().sum() + gate.expert_prob_mean.square().sum() + gate.lse.sum()


def test_backward_refuses_host_tensors_with_cuda_logits():
	# The dispatcher sends CUDA logits with CPU indices to the CUDA kernel: it must refuse, not read a host pointer.
	x = torch.randn(8, 6, device="cuda")
	idx = topk_gate(x, 2).indices
	bwd = torch.ops.tdmpc2_moe.topk_gate_backward
	with pytest.raises(ValueError, match="indices"):
		bwd(torch.ones(8, 2, device="cuda"), None, None, x, idx.cpu(), 1.0, True)
	with pytest.raises(ValueError, match="grad_weights"):
		bwd(torch.ones(8, 2), None, None, x, idx, 1.0, True)
	with pytest.raises(ValueError, match="ring"):
		torch.ops.tdmpc2_moe.topk_gate_record(x, 2, 1.0, True, torch.zeros(4, 6), torch.zeros((), dtype=torch.int64,
																							  device="cuda"))
	with pytest.raises(ValueError, match="cursor"):
		torch.ops.tdmpc2_moe.topk_gate_record(x, 2, 1.0, True, torch.zeros(4, 6, device="cuda"),
											  torch.zeros((), dtype=torch.int64))
	torch.cuda.synchronize()  # the context is still usable


@pytest.mark.parametrize("n, e", [(262144, 8), (262144, 64), (4099, 200), (1, 1024), (100000, 3)])
def test_statistics_are_bit_identical_run_to_run(n, e):
	torch.manual_seed(0)
	x = torch.randn(n, e, device="cuda") * 3
	first = topk_gate(x, 2)
	for _ in range(5):
		again = topk_gate(x, 2)
		assert torch.equal(again.expert_prob_mean, first.expert_prob_mean)
		assert torch.equal(again.expert_frac, first.expert_frac)
	ref = topk_gate_reference(x, 2)
	torch.testing.assert_close(first.expert_prob_mean, ref.expert_prob_mean, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("e", [8, 64])
def test_non_default_stream(e):
	torch.manual_seed(1)
	x = torch.randn(3000, e, device="cuda", requires_grad=True)
	want = topk_gate(x, 2)
	(want_grad,) = torch.autograd.grad(_loss(want), x)
	history = GateHistory(1024, e, device="cuda")
	stream = torch.cuda.Stream()
	stream.wait_stream(torch.cuda.current_stream())
	with torch.cuda.stream(stream):
		got = topk_gate(x, 2, history=history)
		(grad,) = torch.autograd.grad(_loss(got), x)
	torch.cuda.current_stream().wait_stream(stream)
	for a, b in zip(got, want):
		assert torch.equal(a, b)
	assert torch.equal(grad, want_grad)
	assert history.total == 3000
	torch.testing.assert_close(history.snapshot(), dense_routing(want.weights, want.indices, e)[-1024:].cpu())


@pytest.mark.parametrize("e", [8, 64])
def test_cuda_graph_capture_and_replay_of_forward_history_backward(e):
	torch.manual_seed(2)
	n, capacity = 512, 700
	x = torch.randn(n, e, device="cuda", requires_grad=True)
	history = GateHistory(capacity, e, device="cuda")
	warm = torch.cuda.Stream()
	warm.wait_stream(torch.cuda.current_stream())
	with torch.cuda.stream(warm):
		for _ in range(3):
			x.grad = None
			_loss(topk_gate(x, 2, history=history)).backward()
	torch.cuda.current_stream().wait_stream(warm)
	history.clear()
	x.grad = None
	graph = torch.cuda.CUDAGraph()
	with torch.cuda.graph(graph):
		gate = topk_gate(x, 2, history=history)
		_loss(gate).backward()
	assert history.total == 0  # captured, not run
	inputs = [torch.randn(n, e, device="cuda") for _ in range(3)]
	for data in inputs:
		with torch.no_grad():
			x.copy_(data)
		graph.replay()
	torch.cuda.synchronize()
	assert history.total == 3 * n
	xe = inputs[-1].clone().requires_grad_()
	eager = topk_gate(xe, 2)
	_loss(eager).backward()
	assert torch.equal(gate.indices, eager.indices)
	torch.testing.assert_close(gate.weights, eager.weights, rtol=0, atol=0)
	torch.testing.assert_close(x.grad, xe.grad, rtol=0, atol=0)
	rows = torch.cat([dense_routing(g.weights, g.indices, e) for g in (topk_gate(d, 2) for d in inputs)])
	torch.testing.assert_close(history.snapshot(), rows[-capacity:].cpu())


def test_ring_is_written_in_place_under_torch_compile():
	# A functionalised copy of the ring per call would cost capacity * E * 4 bytes of memory and time
	# each step: the compiled graph must write the ring itself.
	torch._dynamo.reset()
	e, capacity = 8, 1 << 20  # a 32 MiB ring
	history = GateHistory(capacity, e, device="cuda")
	x = torch.randn(256, e, device="cuda", requires_grad=True)
	step = torch.compile(lambda x: _loss(topk_gate(x, 2, history=history)), fullgraph=True)
	for _ in range(3):
		step(x).backward()
	torch.cuda.synchronize()
	ring_ptr = history.ring.data_ptr()
	torch.cuda.reset_peak_memory_stats()
	before = torch.cuda.memory_allocated()
	for _ in range(10):
		step(x).backward()
	torch.cuda.synchronize()
	ring_bytes = capacity * e * 4
	assert torch.cuda.max_memory_allocated() - before < ring_bytes // 4
	assert history.ring.data_ptr() == ring_ptr and history.total == 13 * 256


def test_adaptive_temperature_steps_under_cuda_graphs_of_torch_compile():
	# Upstream compiles its update with mode="reduce-overhead" (CUDA graphs) when compile=true. The
	# adaptive temperature binds a new tau tensor each training forward: every replay must read the
	# tau of the step before and move it, as the eager block does.
	import copy
	import math
	from tdmpc2_moe.block.moe import MoEBlock
	torch._dynamo.reset()
	torch.manual_seed(0)
	block = MoEBlock(16, [32, 32], 16, n_experts=4, top_k=4, balance="kl", shared_head=True, orthogonal=True,
					 temperature=1.8, target_entropy=0.75 * math.log(4), temperature_rate=0.1).cuda()
	twin = copy.deepcopy(block)
	compiled = torch.compile(twin, mode="reduce-overhead")
	taus = []
	for _ in range(6):
		x = torch.randn(64, 16, device="cuda")
		block(x).square().sum().backward()
		compiled(x).square().sum().backward()
		torch.cuda.synchronize()
		taus.append(block.stats()["temperature"].item())
		assert twin.stats()["temperature"].item() == pytest.approx(taus[-1], abs=1e-6)
	assert len(set(round(t, 6) for t in taus)) > 1, "the temperature never moved"
	for (name, p), q in zip(block.named_parameters(), twin.parameters()):
		torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
	torch._dynamo.reset()
