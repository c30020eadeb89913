"""
Sparse expert dispatch (docs/design.md 5b): sparse equals dense in values and gradients for every block
option, both sparse paths (exact groups, padded static shapes), empty experts, tied weights, NaN
rows, empty batches, the "auto" rule's refusals, torch.compile, and a patched TD-MPC2 agent.
"""
import copy
import dataclasses
import math

import pytest
import torch
import torch.nn as nn

from conftest import assert_compiled_matches_eager
from tdmpc2_moe import backend
from tdmpc2_moe.block import experts as experts_module
from tdmpc2_moe.block.dispatch import choose, fused_plan, group_by_expert, run_padded, tile_rows
from tdmpc2_moe.block.baselines import SimNorm
from tdmpc2_moe.block.moe import MoEBlock

pytestmark = pytest.mark.filterwarnings("ignore:tdmpc2_moe._C is not built")

IN, HIDDEN, OUT = 12, [32, 24], 16
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CASES = sorted({(e, k) for e in (1, 2, 4, 8, 16) for k in (1, 2, e) if k <= e})


def _twins(dtype=torch.float64, spread=True, device="cpu", **kwargs):
	"""Returns (dense, sparse): the same block (same parameters and buffers) with each dispatch."""
	torch.manual_seed(0)
	kwargs = dict(dict(n_experts=4, top_k=2, aux_coef=0.5, zloss_coef=0.1, history_rows=None), **kwargs)
	dense = MoEBlock(IN, HIDDEN, OUT, dispatch="dense", **kwargs).to(device, dtype)
	if spread:
		# Spread the gate so the top-k choice is not decided by rounding.
		nn.init.normal_(dense.gate.weight, std=1.0)
	return dense, _sparse_twin(dense)


def _sparse_twin(dense, act=None):
	"""Returns a block with the options, parameters and dtype of `dense` that dispatches sparse."""
	sparse = MoEBlock(IN, HIDDEN, OUT, act, options=dataclasses.replace(dense.options, dispatch="sparse"))
	sparse.to(dense.gate.weight.device, dense.gate.weight.dtype).load_state_dict(dense.state_dict())
	return sparse


def _run(block, x, target):
	"""Returns (output, {name: grad} with "x"), from one forward and backward of a squared error."""
	x = x.detach().clone().requires_grad_(True)
	out = block(x)
	((out - target) ** 2).sum().backward()
	grads = {name: p.grad for name, p in block.named_parameters()}
	grads["x"] = x.grad
	return out.detach(), grads


def _assert_same(a, b, rtol=1e-7, atol=1e-9):
	torch.testing.assert_close(a[0], b[0], rtol=rtol, atol=atol, equal_nan=True)
	assert a[1].keys() == b[1].keys()
	for name in a[1]:
		assert a[1][name] is not None and b[1][name] is not None, name
		torch.testing.assert_close(a[1][name], b[1][name], rtol=rtol, atol=atol, equal_nan=True,
								   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("n_experts,top_k", CASES, ids=[f"E{e}k{k}" for e, k in CASES])
@pytest.mark.parametrize("lead", [(40,), (3, 7), (2, 3, 5)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("device", DEVICES)
def test_sparse_equals_dense_values_and_gradients(n_experts, top_k, lead, device):
	# The block runs the routed-experts operator where the extension has its kernels (the CPU; CUDA in
	# a CUDA build), else the exact groups on the CPU and the padded static-shape path on CUDA.
	dense, sparse = _twins(n_experts=n_experts, top_k=top_k, device=device)
	x = torch.randn(*lead, IN, dtype=torch.float64, device=device)
	target = torch.randn(*lead, OUT, dtype=torch.float64, device=device)
	assert sparse.experts.dispatch_for(x.reshape(-1, IN)) == "sparse"
	_assert_same(_run(sparse, x, target), _run(dense, x, target))


OPTIONS = {
	"simnorm_last": dict(act=SimNorm()),
	"shared_head": dict(shared_head=True),
	"kl_balance": dict(balance="kl"),
	"gate_dims": dict(gate_dims=(2, 6)),
	"adaptive_temperature": dict(target_entropy=0.3, temperature_rate=0.1),
	"all_fork_but_orthogonal": dict(act=SimNorm(), shared_head=True, balance="kl", gate_dims=(2, 6),
									 target_entropy=0.3, temperature_rate=0.1),
}


@pytest.mark.parametrize("option", list(OPTIONS))
def test_sparse_equals_dense_for_every_block_option(option):
	kwargs = dict(OPTIONS[option])
	act = kwargs.pop("act", None)
	torch.manual_seed(0)
	dense = MoEBlock(IN, HIDDEN, OUT, act, n_experts=8, top_k=2, history_rows=64, dispatch="dense", **kwargs).double()
	nn.init.normal_(dense.gate.weight, std=1.0)
	sparse = _sparse_twin(dense, copy.deepcopy(act))
	for step in range(3):
		x = torch.randn(50, IN, dtype=torch.float64)
		target = torch.randn(50, OUT, dtype=torch.float64)
		for block in (dense, sparse):
			block.zero_grad()
		_assert_same(_run(sparse, x, target), _run(dense, x, target))
		torch.testing.assert_close(sparse.history.snapshot(), dense.history.snapshot())
		for key, value in dense.stats().items():
			torch.testing.assert_close(sparse.stats()[key], value, msg=lambda m: f"step {step} stats[{key}]: {m}")


def _padded_block_forward(block, x):
	# The block's computation with the padded path in place of the block's own choice.
	gate = block.route(x)
	out = run_padded(block.experts.expert_layers, x, group_by_expert(gate.indices, gate.weights, block.n_experts),
					 block.n_experts)
	return block.layers[-1](out) if block.options.shared_head else out


@pytest.mark.parametrize("n_experts,top_k", CASES, ids=[f"E{e}k{k}" for e, k in CASES])
@pytest.mark.parametrize("rows", [1, 5, 40, 300])
@pytest.mark.parametrize("shared_head", [False, True], ids=["own_head", "shared_head"])
def test_padded_path_equals_dense(n_experts, top_k, rows, shared_head):
	dense, _ = _twins(n_experts=n_experts, top_k=top_k, aux_coef=0.0, zloss_coef=0.0, shared_head=shared_head)
	x = torch.randn(rows, IN, dtype=torch.float64)
	target = torch.randn(rows, OUT, dtype=torch.float64)
	expected = _run(dense, x, target)
	dense.zero_grad()
	xr = x.clone().requires_grad_(True)
	out = _padded_block_forward(dense, xr)
	((out - target) ** 2).sum().backward()
	grads = {name: p.grad for name, p in dense.named_parameters()}
	grads["x"] = xr.grad
	_assert_same((out.detach(), grads), expected)


def test_padded_buffer_bound_holds_for_the_most_uneven_routing():
	# Every slot on one expert and every other expert holding one slot: the padded layout still fits.
	for n_experts, slots in [(4, 512), (16, 512), (8, 1536), (16, 17)]:
		tile = tile_rows(slots, n_experts)
		counts = [slots - (n_experts - 1)] + [1] * (n_experts - 1)
		padded = sum(math.ceil(c / tile) * tile for c in counts)
		assert padded <= math.ceil((slots + n_experts * (tile - 1)) / tile) * tile


# TD-MPC2's heads as the routed-experts operator runs them: reward (a plain last Linear), dynamics
# (SimNorm last), the fork's shared head (the operator runs the hidden layers, the shared layer follows).
FUSED_HEADS = {"reward": dict(), "dynamics": dict(act=SimNorm()), "shared_head": dict(shared_head=True)}
FUSED_CASES = [(4, 1), (4, 2), (8, 2), (4, 4)]


@pytest.mark.skipif(backend() == "reference", reason="tdmpc2_moe._C is not built")
@pytest.mark.parametrize("n_experts,top_k", FUSED_CASES, ids=[f"E{e}k{k}" for e, k in FUSED_CASES])
@pytest.mark.parametrize("rows", [1, 37, 300])
@pytest.mark.parametrize("head", list(FUSED_HEADS))
def test_the_operator_equals_the_grouped_sparse_path_in_float32(head, rows, n_experts, top_k, monkeypatch):
	# What MoEBlock ran before the operator (docs/design.md 22): the exact groups, fifty tensor ops.
	kwargs = dict(FUSED_HEADS[head])
	act = kwargs.pop("act", None)
	torch.manual_seed(0)
	fused = MoEBlock(IN, HIDDEN, OUT, act, n_experts=n_experts, top_k=top_k, history_rows=None, dispatch="sparse",
					 aux_coef=0.5, zloss_coef=0.1, **kwargs)
	nn.init.normal_(fused.gate.weight, std=1.0)
	grouped = copy.deepcopy(fused)
	x, target = torch.randn(rows, IN), torch.randn(rows, OUT)
	assert fused_plan(fused.experts.expert_layers, x) is not None
	got = _run(fused, x, target)
	monkeypatch.setattr(experts_module, "fused_plan", lambda layers, x: None)
	want = _run(grouped, x, target)
	# To 1e-5 per tensor, in norm: both sum in float32, in other orders (the operator's GEMMs cover an
	# expert's rows at once, the weight gradients sum over rows inside BLAS), so single small elements of a
	# gradient summed over hundreds of rows may differ by more than 1e-5 of themselves.
	assert got[1].keys() == want[1].keys()
	for name, a, b in [("out", got[0], want[0]), *((n, got[1][n], want[1][n]) for n in want[1])]:
		err = ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()
		assert err <= 1e-5, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("path", ["grouped", "padded"])
def test_experts_without_rows_get_zero_gradients_and_tied_weights_split_evenly(path):
	# An all-zero gate ties every expert: the top-k are experts 0..k-1 with weight 1/k each, the rest get no row.
	dense, sparse = _twins(n_experts=8, top_k=2, aux_coef=0.0, zloss_coef=0.0, spread=False)
	for block in (dense, sparse):
		nn.init.zeros_(block.gate.weight)
	x = torch.randn(30, IN, dtype=torch.float64)
	target = torch.randn(30, OUT, dtype=torch.float64)
	gate = sparse.route(x)
	assert (gate.indices == torch.tensor([0, 1])).all() and (gate.weights == 0.5).all()
	if path == "grouped":
		got = _run(sparse, x, target)
	else:
		xr = x.clone().requires_grad_(True)
		((_padded_block_forward(sparse, xr) - target) ** 2).sum().backward()
		got = (None, {name: p.grad for name, p in sparse.named_parameters()})
		got[1]["x"] = xr.grad
	expected = _run(dense, x, target)
	if got[0] is not None:
		torch.testing.assert_close(got[0], expected[0])
	_assert_same((expected[0], got[1]), expected)
	for layer in sparse.experts.expert_layers:
		assert layer.weight.grad is not None and (layer.weight.grad[2:] == 0).all()
		assert (layer.weight.grad[:2] != 0).any()


def test_empty_batch_gives_zero_gradients_not_none():
	_, sparse = _twins()
	x = torch.randn(0, IN, dtype=torch.float64, requires_grad=True)
	out = sparse(x)
	assert out.shape == (0, OUT)
	(out.sum() + 0 * sparse.last_aux_loss).backward()
	for name, p in sparse.named_parameters():
		if name.startswith("layers"):
			assert p.grad is not None and (p.grad == 0).all(), name


@pytest.mark.parametrize("path", ["grouped", "padded"])
def test_nan_rows_stay_in_their_rows(path):
	dense, sparse = _twins(n_experts=8, top_k=2, aux_coef=0.0, zloss_coef=0.0)
	x = torch.randn(20, IN, dtype=torch.float64)
	x[3] = float("nan")
	x[0] = float("nan")  # the row the padded path would read for its padding if it did not have its own zero row
	with torch.no_grad():
		out = sparse(x) if path == "grouped" else _padded_block_forward(sparse, x)
		ref = dense(x)
	finite = torch.ones(20, dtype=torch.bool)
	finite[[0, 3]] = False
	assert torch.isnan(out[~finite]).all()
	torch.testing.assert_close(out[finite], ref[finite])
	# A NaN row reaches only the gradients of the experts it was routed to.
	xr = x.clone().requires_grad_(True)
	y = sparse(xr) if path == "grouped" else _padded_block_forward(sparse, xr)
	y[finite].sum().backward()
	assert torch.isfinite(xr.grad[finite]).all()
	routed = set(sparse.route(x[~finite]).indices.reshape(-1).tolist())
	first = sparse.experts.expert_layers[0].weight.grad
	for e in range(8):
		assert torch.isfinite(first[e]).all() or e in routed


def test_auto_rule_and_refusals():
	assert choose("dense", static=False, grad=True, rows=8192, n_experts=16, top_k=1, orthogonal=False) == "dense"
	assert choose("sparse", static=False, grad=True, rows=4, n_experts=4, top_k=4, orthogonal=False) == "sparse"
	for static in (False, True):
		assert choose("auto", static=static, grad=True, rows=8192, n_experts=16, top_k=1, orthogonal=True) == "dense"
		assert choose("auto", static=static, grad=True, rows=8192, n_experts=8, top_k=8, orthogonal=False) == "dense"
		assert choose("auto", static=static, grad=True, rows=0, n_experts=8, top_k=1, orthogonal=False) == "dense"
		assert choose("auto", static=static, grad=True, rows=8192, n_experts=16, top_k=1, orthogonal=False) == "sparse"
	# Tiny batches stay dense (measured: no gain at 8 rows for E=4, k=2).
	assert choose("auto", static=False, grad=True, rows=8, n_experts=4, top_k=2, orthogonal=False) == "dense"
	assert choose("auto", static=False, grad=True, rows=512, n_experts=4, top_k=2, orthogonal=False) == "sparse"
	# The padded path's backward lost to dense at 256 training rows; without grad it won.
	assert choose("auto", static=True, grad=True, rows=256, n_experts=4, top_k=2, orthogonal=False) == "dense"
	assert choose("auto", static=True, grad=False, rows=256, n_experts=4, top_k=2, orthogonal=False) == "sparse"
	with pytest.raises(ValueError, match="dispatch"):
		MoEBlock(IN, HIDDEN, OUT, dispatch="fast")
	with pytest.raises(ValueError, match="dispatch='sparse' cannot run with orthogonal"):
		MoEBlock(IN, HIDDEN, OUT, n_experts=4, top_k=4, orthogonal=True, dispatch="sparse")
	block = MoEBlock(IN, HIDDEN, OUT, n_experts=4, top_k=4, orthogonal=True)
	assert block.experts.dispatch_for(torch.zeros(8192, IN)) == "dense"


# Inductor only for sparse (about a minute of C++ compilation on the CPU); dense's graph is the one
# test_moe_block.py already compiles. fullgraph=True also proves that the compiled sparse path (the
# padded one) reads nothing on the host.
@pytest.mark.parametrize("dispatch,backend", [("dense", "eager"), ("dense", "aot_eager"), ("sparse", "eager"),
											  ("sparse", "aot_eager"), ("sparse", "inductor")])
@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager(dispatch, backend):
	# Each compiled block adds graphs for MoEBlock.forward's code object (grad and no_grad): start and end
	# with dynamo's caches empty so that the suite's other compile tests stay within the recompile limit.
	torch._dynamo.reset()
	try:
		_compile_and_compare(dispatch, backend)
	finally:
		torch._dynamo.reset()


def _compile_and_compare(dispatch, backend):
	torch.manual_seed(0)
	block = MoEBlock(8, [16, 16], 4, n_experts=4, top_k=2, zloss_coef=0.01, dispatch=dispatch)
	nn.init.normal_(block.gate.weight, std=1.0)
	assert_compiled_matches_eager(block, backend)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (checks for device-to-host synchronisation)")
def test_sparse_forward_and_backward_never_synchronise_with_the_host_on_cuda():
	block = MoEBlock(IN, HIDDEN, OUT, n_experts=8, top_k=2, dispatch="sparse").cuda()
	x = torch.randn(300, IN, device="cuda", requires_grad=True)
	block(x).square().mean().backward()  # first call: allocations, lazy initialisation
	torch.cuda.synchronize()
	torch.cuda.set_sync_debug_mode("error")
	try:
		block(x).square().mean().backward()
	finally:
		torch.cuda.set_sync_debug_mode("default")


def test_grouping_is_a_stable_permutation_of_the_slots():
	indices = torch.tensor([[2, 0], [0, 1], [2, 1], [0, 2]])
	weights = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.5, 0.5], [0.9, 0.1]])
	g = group_by_expert(indices, weights, 4)
	assert g.counts.tolist() == [3, 2, 3, 0]
	assert g.experts.tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
	assert g.rows.tolist() == [0, 1, 3, 1, 2, 0, 2, 3]
	torch.testing.assert_close(g.weights, torch.tensor([0.4, 0.7, 0.9, 0.3, 0.5, 0.6, 0.5, 0.1]))


def _agent(cfg, seed=0):
	from tdmpc2 import TDMPC2
	torch.manual_seed(seed)
	return TDMPC2(cfg)


def test_patched_update_and_act_with_sparse_dispatch_match_dense(walker_cfg, make_buffer):
	from tdmpc2_moe.upstream.heads import moe_blocks
	agents = {}
	for dispatch in ("dense", "sparse"):
		cfg = walker_cfg("use_moe=true", "moe_experts=4", "moe_top_k=1", f"moe_dispatch={dispatch}")
		agents[dispatch] = _agent(cfg)
		blocks = moe_blocks(agents[dispatch].model)
		assert set(blocks) == {"dynamics", "reward", "pi"}
		assert all(b.options.dispatch == dispatch for b in blocks.values())
	buffer = make_buffer(cfg)
	infos = {}
	for dispatch, agent in agents.items():
		torch.manual_seed(1)
		for _ in range(3):
			infos[dispatch] = agent.update(buffer)
	for key in ("consistency_loss", "reward_loss", "value_loss", "pi_loss", "moe_aux_loss"):
		assert torch.isfinite(infos["sparse"][key]), key
		torch.testing.assert_close(infos["sparse"][key], infos["dense"][key], rtol=1e-4, atol=1e-5, msg=key)
	# Adam divides each gradient by its running scale, so an entry whose gradient is ~0 turns float noise
	# between the dispatch paths into a step of up to lr (3e-4): allow a third of one step.
	for (name, p), q in zip(agents["dense"].model.named_parameters(), agents["sparse"].model.parameters()):
		torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")
	obs = torch.randn(24)
	actions = {}
	for dispatch, agent in agents.items():
		torch.manual_seed(3)
		actions[dispatch] = agent.act(obs, t0=True, eval_mode=True)
	assert actions["sparse"].shape == (6,) and torch.isfinite(actions["sparse"]).all()
	torch.testing.assert_close(actions["sparse"], actions["dense"], rtol=1e-3, atol=1e-4)


def test_moe_dispatch_setting_reaches_the_blocks_and_rejects_other_values():
	from tdmpc2_moe.settings import MoESettings
	assert MoESettings.resolve().moe_dispatch == "auto"
	assert MoESettings.resolve(moe_dispatch="sparse").block_options().dispatch == "sparse"
	assert MoESettings.resolve({"moe_dispatch": "dense"}).block_options().dispatch == "dense"
	with pytest.raises(ValueError, match="moe_dispatch"):
		MoESettings.resolve(moe_dispatch="grouped")
