"""
MoEBlock: values and gradients against a plain-PyTorch MoE built on the reference gate, drop-in
behaviour, aux loss. The tests taking `on_device` run on cuda too where there is a GPU (gpu_check.sh).
"""
import gc
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tdmpc2_moe.block.baselines import SimNorm
from tdmpc2_moe.block.moe import MoEBlock
from tdmpc2_moe.ops.reference import topk_gate_reference
from conftest import DATA

pytestmark = pytest.mark.filterwarnings("ignore:tdmpc2_moe._C is not built")


def plain_moe(block, x):
	"""The block's computation written expert by expert with the reference gate; returns (out, aux)."""
	gate = topk_gate_reference(block.gate(x), block.top_k, block.options.temperature)
	outs = []
	for e in range(block.n_experts):
		h = x
		for layer in block:
			h = F.linear(h, layer.weight[e], layer.bias[e])
			if layer.norm:
				h = layer.act(F.layer_norm(h, (layer.out_features,), layer.ln_weight[e], layer.ln_bias[e]))
		outs.append(h)
	y = torch.stack(outs, 1)
	sel = y.gather(1, gate.indices.unsqueeze(-1).expand(-1, -1, y.shape[-1]))
	out = (gate.weights.to(y.dtype).unsqueeze(-1) * sel).sum(1)
	aux = block.options.aux_coef * block.n_experts * (gate.expert_frac * gate.expert_prob_mean).sum() \
		+ block.options.zloss_coef * gate.lse.pow(2).mean()
	return out, aux


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "per_expert"])
@pytest.mark.parametrize("n_experts,top_k,act", [(4, 2, None), (8, 1, None), (4, 4, SimNorm()), (3, 2, SimNorm())])
def test_values_and_gradients_match_plain_moe_in_float64(n_experts, top_k, act, batched, on_device):
	torch.manual_seed(0)
	block = MoEBlock(12, [32, 24], 16, act=act, n_experts=n_experts, top_k=top_k, temperature=0.7,
					 aux_coef=0.5, zloss_coef=0.1, history_rows=None).double()
	block.experts.batched = batched
	# Spread the gate so the top-k choice is not decided by float32 rounding.
	nn.init.normal_(block.gate.weight, std=1.0)
	x = torch.randn(40, 12, dtype=torch.float64, requires_grad=True)
	target = torch.randn(40, 16, dtype=torch.float64)
	out = block(x)
	((out - target) ** 2).sum().backward()
	grads = [p.grad.clone() for p in block.parameters()] + [x.grad.clone()]
	aux_block = block.last_aux_loss.clone()
	block.zero_grad()
	x.grad = None
	ref, aux = plain_moe(block, x)
	(((ref - target) ** 2).sum() + aux).backward()
	ref_grads = [p.grad for p in block.parameters()] + [x.grad]
	assert out.dtype == torch.float64
	# The experts run in float64; the gate computes in float32 (compiled op vs reference: ulp-level differences).
	torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-7)
	torch.testing.assert_close(aux_block, aux.detach().to(aux_block.dtype), rtol=1e-5, atol=1e-7)
	for name, g, r in zip([n for n, _ in block.named_parameters()] + ["x"], grads, ref_grads):
		torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_batched_and_per_expert_paths_agree(on_device):
	torch.manual_seed(0)
	block = MoEBlock(6, [16, 16], 5, n_experts=4, top_k=2)
	x = torch.randn(30, 6)
	block.experts.batched = False
	per_expert, per_expert_features = block(x), block.experts.features(x)
	block.experts.batched = True
	torch.testing.assert_close(block(x), per_expert)
	torch.testing.assert_close(block.experts.features(x), per_expert_features)


def test_any_leading_shape(on_device):
	torch.manual_seed(0)
	block = MoEBlock(6, 16, 5, n_experts=4, top_k=2)
	x = torch.randn(3, 7, 6)
	flat = block(x.reshape(-1, 6))
	assert block(x).shape == (3, 7, 5)
	torch.testing.assert_close(block(x), flat.reshape(3, 7, 5))
	assert block(x[0, 0]).shape == (5,)
	torch.testing.assert_close(block(x[0, 0]), flat[0])
	assert block(torch.randn(0, 6)).shape == (0, 5)


def test_block_is_indexable_like_upstream_mlp_and_zeroing_last_weight_zeroes_every_expert():
	block = MoEBlock(10, [32, 32], 7, n_experts=5)
	assert len(block) == 3
	assert block[-1].weight.shape == (5, 7, 32)
	assert block[-1].weight is block[2].weight
	assert isinstance(block[-1].weight, nn.Parameter)
	# What upstream's `init.zero_([model._reward[-1].weight])` does.
	for p in [block[-1].weight]:
		p.data.fill_(0)
	out = block(torch.randn(64, 10))
	assert torch.equal(out, torch.zeros_like(out))


def test_init_matches_tdmpc2():
	torch.manual_seed(0)
	block = MoEBlock(256, [512, 512], 512, n_experts=4)
	for layer in block:
		assert abs(layer.weight.std().item() - 0.02) < 0.001
		assert torch.equal(layer.bias, torch.zeros_like(layer.bias))
	assert torch.equal(block.gate.bias, torch.zeros_like(block.gate.bias))
	assert abs(block.gate.weight.std().item() - 0.02) < 0.003


def test_simnorm_act_keeps_each_group_on_the_simplex():
	torch.manual_seed(0)
	block = MoEBlock(10, [32], 24, act=SimNorm(), n_experts=4, top_k=2)
	nn.init.normal_(block.gate.weight, std=1.0)
	out = block(torch.randn(2, 9, 10))
	torch.testing.assert_close(out.view(2, 9, 3, 8).sum(-1), torch.ones(2, 9, 3))


def test_dropout_only_in_training_mode():
	torch.manual_seed(0)
	block = MoEBlock(8, [64, 64], 4, dropout=0.5, n_experts=2, top_k=1)
	x = torch.randn(16, 8)
	assert not torch.equal(block(x), block(x))
	block.eval()
	torch.testing.assert_close(block(x), block(x))


def test_zero_loss_through_output_still_balances_the_gate():
	torch.manual_seed(0)
	block = MoEBlock(8, [16], 4, n_experts=4, top_k=1, aux_coef=1.0)
	with torch.no_grad():
		block.gate.bias.copy_(torch.tensor([2.0, 0.0, 0.0, 0.0]))
	x = torch.randn(256, 8)
	(block(x) * 0).sum().backward()
	assert block.gate.bias.grad.abs().sum() > 0
	assert block.gate.bias.grad[0] > 0
	opt = torch.optim.SGD(block.gate.parameters(), lr=2.0)
	start = block.stats()["max_load"].item()
	for _ in range(30):
		opt.zero_grad()
		(block(x) * 0).sum().backward()
		opt.step()
	with torch.no_grad():
		block.history.clear()
		block(x)
	assert block.stats()["max_load"].item() < start - 0.2


def test_without_aux_coef_a_zero_loss_leaves_the_gate_alone():
	block = MoEBlock(8, [16], 4, aux_coef=0.0)
	(block(torch.randn(32, 8)) * 0).sum().backward()
	assert torch.equal(block.gate.weight.grad, torch.zeros_like(block.gate.weight))


def _live_tensors():
	gc.collect()
	with warnings.catch_warnings():
		# isinstance() on lazily deprecated torch attributes found by gc would warn.
		warnings.simplefilter("ignore")
		return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def test_no_grad_keeps_nothing_and_still_logs_aux():
	torch.manual_seed(0)
	block = MoEBlock(8, [16], 4, history_rows=32)
	with torch.no_grad():
		out = block(torch.randn(16, 8))
		first = block.last_aux_loss.clone()
		assert out.grad_fn is None and not block.last_aux_loss.requires_grad
		block(torch.randn(16, 8) * 5)
		assert not torch.equal(first, block.last_aux_loss)
		before = _live_tensors()
		for _ in range(200):
			block(torch.randn(16, 8))
		assert _live_tensors() <= before
	assert block.history.total == 16 * 202


def test_stats_are_device_tensors_with_and_without_history(on_device):
	torch.manual_seed(0)
	for rows in (128, None):
		block = MoEBlock(8, [16], 4, n_experts=4, top_k=2, history_rows=rows)
		with torch.no_grad():
			block(torch.randn(64, 8))
		s = block.stats()
		assert {"usage", "mean_weight", "entropy", "max_load", "aux_loss"} <= s.keys()
		assert all(isinstance(v, torch.Tensor) for v in s.values())
		torch.testing.assert_close(s["usage"].sum(), torch.tensor(1.0))
		torch.testing.assert_close(s["mean_weight"].sum(), torch.tensor(1.0))
		assert 0 < s["entropy"].item() <= math.log(2) + 1e-6
		assert s["max_load"].item() == s["usage"].max().item()
	assert block.history is None


def test_history_records_every_routed_row(on_device):
	block = MoEBlock(8, [16], 4, n_experts=4, top_k=2, history_rows=100)
	with torch.no_grad():
		block(torch.randn(3, 10, 8))
	snap = block.history.snapshot()
	assert snap.shape == (30, 4)
	assert ((snap > 0).sum(-1) == 2).all()
	torch.testing.assert_close(snap.sum(-1), torch.ones(30, device=snap.device))


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "per_expert"])
def test_torch_compile_fullgraph_matches_eager(batched):
	torch.manual_seed(0)
	block = MoEBlock(8, [16, 16], 4, n_experts=4, top_k=2, zloss_coef=0.01)
	block.experts.batched = batched
	x = torch.randn(2, 16, 8)
	eager = block(x)
	eager.square().sum().backward()
	grads = [p.grad.clone() for p in block.parameters()]
	block.zero_grad()
	compiled = torch.compile(block, fullgraph=True, backend="eager")
	out = compiled(x)
	out.square().sum().backward()
	torch.testing.assert_close(out, eager)
	for g, p in zip(grads, block.parameters()):
		torch.testing.assert_close(p.grad, g)
	with torch.no_grad():
		assert compiled(x).grad_fn is None


@pytest.mark.parametrize("kwargs,name", [
	(dict(top_k=5), "top_k"),
	(dict(top_k=0), "top_k"),
	(dict(n_experts=0), "n_experts"),
	(dict(history_rows=-4), "history_rows"),
	(dict(aux_coef=-0.1), "aux_coef"),
	(dict(zloss_coef=-1.0), "zloss_coef"),
	(dict(temperature=0.0), "temperature"),
	(dict(in_dim=0), "in_dim"),
])
def test_bad_constructor_arguments_name_the_argument(kwargs, name):
	args = dict(in_dim=8, mlp_dims=[16], out_dim=4, n_experts=4, top_k=2)
	args.update(kwargs)
	with pytest.raises(ValueError, match=name):
		MoEBlock(args.pop("in_dim"), args.pop("mlp_dims"), args.pop("out_dim"), **args)


def test_state_dicts_saved_before_the_router_experts_split_still_load():
	# Written by MoEBlock at commit e967d95 (gate, adaptive_temperature and layers directly on the block):
	# a default block and one with the fork's options, as built from a seed and after three SGD steps
	# (the temperature moved). The same seed still draws the same parameters.
	saved = torch.load(DATA / "moeblock_before_split.pt", weights_only=True)
	for case in saved.values():
		torch.manual_seed(case["init_seed"])
		block = MoEBlock(8, [16], 4, **case["options"])
		fresh = block.state_dict()
		assert list(fresh) == [f"{'router.' if k.startswith(('gate', 'adaptive')) else 'experts.'}{k}" for k in case["init"]]
		for key, value in case["init"].items():
			assert torch.equal(fresh[("router." if key.startswith(("gate", "adaptive")) else "experts.") + key], value), key
		block.load_state_dict(case["state"])
		block.eval()
		with torch.no_grad():
			# The outputs were saved on another CPU. The parameters above are bit-equal on any machine (the
			# same seed, the same draws), but the forward's matmuls take the vector width and blocking of the
			# CPU at hand (MKL / oneDNN paths): 7.9e-9 apart between an AVX-512 Xeon and an AMD EPYC.
			# Bit-exact holds within one machine and thread count (tests/runs/test_reproducible.py), not across.
			torch.testing.assert_close(block(case["x"]), case["y"], rtol=1e-6, atol=1e-6)


def test_no_history_with_none_or_zero_rows():
	# 0 is what the config key gate_history_rows=0 passes; both mean: keep no ring.
	for rows in (None, 0):
		block = MoEBlock(8, [16], 4, history_rows=rows)
		block(torch.randn(5, 8))
		assert block.history is None and int(block.stats()["rows"]) == 5


def test_mismatched_input_dim_names_in_dim():
	block = MoEBlock(8, [16], 4)
	with pytest.raises(ValueError, match="in_dim"):
		block(torch.randn(5, 9))
