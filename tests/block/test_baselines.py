"""The fork-style leaky re-implementation of the fork's model: same function as MoEBlock with the fork
options (given the same weights), and the fork's costs (growing host list, detached accumulator)."""
import math

import pytest
import torch
import torch.nn as nn

from tdmpc2_moe.block.baselines import LeakyForkMoEBlock, SimNorm
from tdmpc2_moe.block.moe import MoEBlock

E, IN, HIDDEN, OUT = 4, 10, [32, 32], 16


def _pair(freeze=0, rate=0.1):
	torch.manual_seed(0)
	act = SimNorm()
	block = MoEBlock(IN, HIDDEN, OUT, act=act, n_experts=E, top_k=E, temperature=1.8, aux_coef=0.03, balance="kl",
					 shared_head=True, orthogonal=True, target_entropy=0.75 * math.log(E), temperature_rate=rate,
					 temperature_freeze=freeze, history_rows=None)
	leaky = LeakyForkMoEBlock(IN, HIDDEN, OUT, act=act, n_experts=E, temperature=1.8, aux_coef=0.03,
							  temperature_rate=rate, temperature_freeze=freeze)
	with torch.no_grad():
		nn.init.normal_(block.gate.weight, std=0.5)
		for i in range(len(HIDDEN)):
			for e in range(E):
				layer = leaky.experts[e][i]
				layer.weight.copy_(block[i].weight[e])
				layer.bias.copy_(block[i].bias[e])
				layer.ln.weight.copy_(block[i].ln_weight[e])
				layer.ln.bias.copy_(block[i].ln_bias[e])
		for ours, theirs in [(block[-1].weight, leaky.head.weight), (block[-1].bias, leaky.head.bias),
							 (block[-1].ln_weight, leaky.head.ln.weight), (block[-1].ln_bias, leaky.head.ln.bias)]:
			theirs.copy_(ours)
		leaky.gate.weight.zero_()   # the temperature column contributes nothing, and the fork's gate has no bias
		leaky.gate.weight[:, :IN].copy_(block.gate.weight)
	return block, leaky


def test_same_function_and_temperature_path_as_moe_block_with_fork_options():
	block, leaky = _pair(freeze=2)
	aux = torch.zeros(())
	for _ in range(6):
		x = torch.randn(3, 20, IN)
		out, ref = block(x), leaky(x)
		out.sum().backward()
		aux += block.last_aux_loss
		torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
		assert block.stats()["temperature"].item() == pytest.approx(leaky.tau, abs=1e-5)
	assert leaky.tau != 1.8
	torch.testing.assert_close(leaky.aux_loss, aux, rtol=1e-4, atol=1e-7)


def test_leaky_fork_keeps_host_copies_and_its_kl_term_trains_nothing():
	_, leaky = _pair()
	x = torch.randn(64, IN)
	for _ in range(30):
		leaky(x).sum().backward()
	assert len(leaky.gate_history) == 30 and leaky.gate_history[0].device.type == "cpu"
	assert leaky.history_bytes() == 30 * E * 4
	assert not leaky.aux_loss.requires_grad and leaky.aux_loss > 0
	leaky.zero_grad()
	(leaky(x) * 0).sum().backward()
	assert torch.equal(leaky.gate.weight.grad, torch.zeros_like(leaky.gate.weight))
	for _ in range(1000):
		with torch.no_grad():
			leaky(x[:2])
	assert len(leaky.gate_history) <= 1000
	assert leaky[-1] is leaky.head and len(leaky) == len(HIDDEN) + 1
