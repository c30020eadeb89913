"""
Experts of their own width (`expert_dim`, `moe_expert_dim`; docs/design.md 16): the layer shapes,
values and gradients against a plain-PyTorch model written here with those widths, the world model
patch() builds, checkpoints that carry the width and name both values on a mismatch, bad values.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tdmpc2_moe.upstream import heads
from tdmpc2_moe.block.moe import MoEBlock
from tdmpc2_moe.settings import MoESettings

IN, HIDDEN, OUT, WIDTH = 12, [32, 32], 10, 7


def plain_model(block, x, shared_head):
	"""The top-k MoE with experts of width WIDTH, written row by row from the block's parameters (float64)."""
	probs = torch.softmax(F.linear(x, block.gate.weight, block.gate.bias), -1)
	top, idx = torch.topk(probs, block.top_k, dim=-1)
	top = top / top.sum(-1, keepdim=True)
	rows = []
	n_expert_layers = len(block) - 1 if shared_head else len(block)
	for n in range(x.shape[0]):
		mixed = 0
		for w, e in zip(top[n], idx[n]):
			h = x[n]
			for i in range(n_expert_layers):
				layer = block[i]
				h = F.linear(h, layer.weight[e], layer.bias[e])
				if layer.norm:
					h = F.mish(F.layer_norm(h, (layer.out_features,)) * layer.ln_weight[e] + layer.ln_bias[e])
			mixed = mixed + w * h
		rows.append(F.linear(mixed, block[-1].weight, block[-1].bias) if shared_head else mixed)
	return torch.stack(rows)


@pytest.mark.parametrize("shared_head", [False, True], ids=["experts", "shared_head"])
@pytest.mark.parametrize("dispatch", ["dense", "sparse"])
def test_values_and_gradients_match_a_plain_model_with_those_widths(shared_head, dispatch):
	torch.manual_seed(0)
	block = MoEBlock(IN, HIDDEN, OUT, n_experts=4, top_k=2, expert_dim=WIDTH, shared_head=shared_head,
					 dispatch=dispatch, aux_coef=0.0, history_rows=None).double()
	assert block[0].weight.shape == (4, WIDTH, IN) and block[1].weight.shape == (4, WIDTH, WIDTH)
	assert block[-1].weight.shape == ((OUT, WIDTH) if shared_head else (4, OUT, WIDTH))
	nn.init.normal_(block.gate.weight)
	x = torch.randn(24, IN, dtype=torch.float64, requires_grad=True)
	out = block(x)
	out.square().sum().backward()
	grads = [p.grad.clone() for p in block.parameters()] + [x.grad.clone()]
	block.zero_grad()
	x.grad = None
	ref = plain_model(block, x, shared_head)
	ref.square().sum().backward()
	torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
	for (name, _), g, want in zip(list(block.named_parameters()) + [("x", None)], grads, list(block.parameters()) + [x]):
		torch.testing.assert_close(g, want.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_none_keeps_the_heads_width_and_bad_values_name_the_argument():
	assert MoEBlock(IN, HIDDEN, OUT)[0].weight.shape == (4, 32, IN)
	for bad in (0, -3, 2.5, "8"):
		with pytest.raises(ValueError, match="expert_dim"):
			MoEBlock(IN, HIDDEN, OUT, expert_dim=bad)
		with pytest.raises(ValueError, match="moe_expert_dim"):
			MoESettings.resolve(use_moe=True, moe_expert_dim=bad)
	# orthogonal needs E <= the mixed width, which is expert_dim with a shared head
	with pytest.raises(ValueError, match="mlp_dims"):
		MoEBlock(IN, HIDDEN, OUT, n_experts=8, top_k=8, orthogonal=True, shared_head=True, expert_dim=6)


def test_world_model_heads_and_checkpoints_carry_the_width(walker_cfg, tmp_path):
	from tdmpc2 import TDMPC2
	matched = ["use_moe=true", "moe_experts=8", "moe_top_k=2", "moe_expert_dim=192"]
	agent = TDMPC2(walker_cfg(*matched))
	blocks = heads.moe_blocks(agent.model)
	assert set(blocks) == {"dynamics", "reward", "pi"}
	for block in blocks.values():
		assert all(layer.weight.shape[1] == 192 for layer in block.experts.expert_layers[:-1])
		assert block[-1].weight.shape[-1] == 192
	path = tmp_path / "matched.pt"
	agent.save(path)
	assert torch.load(path, weights_only=True)["moe"]["moe_expert_dim"] == 192
	restored = TDMPC2(walker_cfg(*matched))
	restored.load(path)
	for name, p in agent.model.state_dict().items():
		if isinstance(p, torch.Tensor):
			torch.testing.assert_close(restored.model.state_dict()[name], p, msg=name)
	with pytest.raises(ValueError, match=r"moe_expert_dim=192.*moe_expert_dim=null"):
		TDMPC2(walker_cfg("use_moe=true", "moe_experts=8", "moe_top_k=2")).load(path)
