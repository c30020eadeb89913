"""
Adam on the CPU (tdmpc2_moe/upstream/device.py `cpu_adam_fused`): a patched agent on device=cpu gets
torch's fused Adam for both optimisers, `TDMPC2_MOE_CPU_ADAM=loop` gives the loop over tensors, the two
train to the same weights but for float rounding, a bad value names the variable; and a checkpoint's
optimiser loads its moments without bringing the saving machine's implementation flags along
(runs/checkpoint.py `load_optimizer`).
"""
import copy

import pytest
import torch

from tdmpc2_moe.runs import checkpoint
from tdmpc2_moe.upstream.device import TorchOn


def _agent(walker_cfg):
	from tdmpc2 import TDMPC2
	torch.manual_seed(0)
	return TDMPC2(walker_cfg("use_moe=true", "moe_experts=4", "batch_size=16"))


def _fused(optimizer):
	return [bool(group["fused"]) for group in optimizer.param_groups]


def test_a_cpu_agent_gets_the_fused_adam_and_the_knob_gives_the_loop(walker_cfg, monkeypatch):
	agent = _agent(walker_cfg)
	assert _fused(agent.optim) == [True] * len(agent.optim.param_groups) and _fused(agent.pi_optim) == [True]
	monkeypatch.setenv("TDMPC2_MOE_CPU_ADAM", "loop")
	agent = _agent(walker_cfg)
	assert not any(_fused(agent.optim) + _fused(agent.pi_optim))
	assert not any(group["capturable"] for group in agent.optim.param_groups)


def test_fused_and_loop_train_alike_but_for_rounding(walker_cfg, make_buffer, monkeypatch):
	weights = {}
	for choice in ("fused", "loop"):
		monkeypatch.setenv("TDMPC2_MOE_CPU_ADAM", choice)
		agent = _agent(walker_cfg)
		buffer = make_buffer(agent.cfg, episodes=2)
		torch.manual_seed(1)
		for _ in range(5):
			agent.update(buffer)
		weights[choice] = {k: v.detach().clone() for k, v in agent.model.state_dict().items() if torch.is_tensor(v) and v.is_floating_point()}
	moved = 0
	for key, fused in weights["fused"].items():
		loop = weights["loop"][key]
		assert torch.allclose(fused, loop, rtol=1e-4, atol=1e-6), key
		moved += int((fused != loop).sum())
	# Not the same code: some rounding differs (else this test would not tell the two apart).
	assert moved > 0


def test_a_bad_knob_names_the_variable(monkeypatch):
	monkeypatch.setenv("TDMPC2_MOE_CPU_ADAM", "fast")
	with pytest.raises(ValueError, match="TDMPC2_MOE_CPU_ADAM"):
		TorchOn(torch.device("cpu")).optim.Adam([torch.zeros(3, requires_grad=True)], lr=1e-3)


def test_an_explicit_implementation_and_cuda_keep_what_the_caller_asked_for():
	p = [torch.zeros(3, requires_grad=True)]
	assert not TorchOn(torch.device("cpu")).optim.Adam(p, lr=1e-3, foreach=False).param_groups[0]["fused"]
	# On CUDA the caller's capturable stays (built only: nothing steps here without a GPU).
	group = TorchOn(torch.device("cuda")).optim.Adam(p, lr=1e-3, capturable=True).param_groups[0]
	assert group["capturable"] and not group["fused"]


def _stepped(optimizer, params, steps=3):
	g = torch.Generator().manual_seed(0)
	for _ in range(steps):
		for p in params:
			p.grad = torch.randn(p.shape, generator=g)
		optimizer.step()


@pytest.mark.parametrize("saved_flags", [dict(fused=False), dict(fused=None, capturable=True, foreach=True)],
						 ids=["loop_cpu", "capturable_cuda"])
def test_a_loaded_optimizer_keeps_its_own_implementation(saved_flags):
	params = [torch.randn(5, 4, requires_grad=True), torch.randn(4, requires_grad=True)]
	saved = torch.optim.Adam(params, lr=1e-3, foreach=False)
	_stepped(saved, params)
	state = copy.deepcopy(saved.state_dict())  # else both would step the same moment tensors
	state["param_groups"][0].update(saved_flags)  # as that machine wrote it

	mine = [p.detach().clone().requires_grad_() for p in params]
	optimizer = TorchOn(torch.device("cpu")).optim.Adam(mine, lr=1e-3)
	checkpoint.load_optimizer(optimizer, state)
	group = optimizer.param_groups[0]
	assert group["fused"] is True and group["capturable"] is False and group["foreach"] is None
	for i, p in enumerate(mine):
		assert torch.equal(optimizer.state[p]["exp_avg"], state["state"][i]["exp_avg"])
		assert float(optimizer.state[p]["step"]) == 3.0
	_stepped(optimizer, mine, steps=1)  # a capturable group on CPU parameters would raise here
	_stepped(saved, params, steps=1)
	for a, b in zip(mine, params):
		assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
