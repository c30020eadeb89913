"""
moe_preset=fork and the fork-model settings on the TD-MPC2 side (docs/design.md 5a, 6): resolution (a key
set explicitly wins over the preset), validation, the structure patch() builds on a real upstream
checkout, single-task and multitask, and checkpoints that name the settings they disagree on.
"""
import math

import pytest
import torch

from tdmpc2_moe.upstream import heads
from tdmpc2_moe.block.moe import MoEBlock
from tdmpc2_moe.settings.config_keys import checkpoint_overrides, config_defaults
from tdmpc2_moe.settings import MoESettings

FORK = ["use_moe=true", "moe_preset=fork"]


def test_fork_preset_resolves_to_the_forks_model():
	s = MoESettings.resolve({"steps": 1_000_000, "multitask": False}, use_moe=True, moe_preset="fork")
	assert s.moe_heads == ("dynamics", "reward") and s.moe_top_k == s.moe_experts == 4
	assert (s.moe_orthogonal, s.moe_shared_head, s.moe_gate_input) == (True, True, "input")
	assert (s.moe_balance, s.moe_aux_coef, s.moe_temperature) == ("kl", 0.03, 1.8)
	assert s.moe_target_entropy == pytest.approx(0.75 * math.log(4))
	assert (s.moe_temperature_bounds, s.moe_temperature_rate) == ((0.5, 2.0), 0.02)
	assert s.moe_temperature_freeze == 50_000  # 5% of 1M steps
	assert (s.moe_temperature_freeze_unit, s.moe_last_norm, s.moe_gate_offset) == ("forwards", True, True)
	assert MoESettings.resolve({"steps": 20_000}, use_moe=True, moe_preset="fork").moe_temperature_freeze == 5000
	assert MoESettings.resolve({"multitask": True}, use_moe=True, moe_preset="fork").moe_gate_input == "task"


def test_explicit_keys_win_over_the_preset_and_null_config_keys_do_not():
	cfg = dict(config_defaults(), use_moe=True, moe_preset="fork", moe_experts=8, moe_aux_coef=0.1)
	s = MoESettings.resolve(cfg, moe_heads=("dynamics",))
	assert s.moe_top_k == 8 and s.moe_target_entropy == pytest.approx(0.75 * math.log(8))
	assert s.moe_aux_coef == 0.1 and s.moe_heads == ("dynamics",) and s.moe_balance == "kl"
	assert MoESettings.resolve(config_defaults()) == MoESettings.resolve()


@pytest.mark.parametrize("key, value", [
	("moe_preset", "moore"), ("moe_balance", "entropy"), ("moe_shared_head", "yes"), ("moe_orthogonal", 1),
	("moe_gate_input", "obs"), ("moe_target_entropy", -0.1), ("moe_temperature_bounds", [2.0, 0.5]),
	("moe_temperature_bounds", [0.5]), ("moe_temperature_rate", 0.0), ("moe_temperature_freeze", -1),
	("moe_temperature_freeze_unit", "steps"), ("moe_last_norm", "true"), ("moe_gate_offset", 0),
])
def test_bad_fork_settings_raise_naming_the_key(key, value):
	with pytest.raises(ValueError, match=key):
		MoESettings.resolve({"use_moe": True, key: value})


def test_preset_without_use_moe_and_task_gate_on_a_single_task_agent_say_why():
	with pytest.raises(ValueError, match="moe_preset=fork.*use_moe"):
		MoESettings.resolve(moe_preset="fork")
	with pytest.raises(ValueError, match="moe_gate_input=task needs a multitask agent"):
		MoESettings.resolve({"use_moe": True, "moe_gate_input": "task", "multitask": False})


def test_checkpoint_overrides_rebuild_the_architecture():
	s = MoESettings.resolve(use_moe=True, moe_preset="fork", moe_experts=2)
	overrides = checkpoint_overrides(s.checkpoint_dict())
	assert "moe_orthogonal=true" in overrides and "moe_shared_head=true" in overrides
	assert "moe_heads=[dynamics,reward]" in overrides and "moe_balance=kl" in overrides
	assert "moe_last_norm=true" in overrides and "moe_gate_offset=true" in overrides
	assert not any(o.startswith(("moe_aux_coef", "moe_preset")) for o in overrides)


def test_checkpoints_saved_before_a_key_existed_rebuild_their_own_model():
	# A fork-preset checkpoint written before moe_last_norm / moe_gate_offset existed had neither:
	# its overrides must say false, or today's preset would build another reward head and gate.
	saved = MoESettings.resolve(use_moe=True, moe_preset="fork").checkpoint_dict()
	del saved["moe_last_norm"], saved["moe_gate_offset"]
	overrides = checkpoint_overrides(saved)
	assert "moe_last_norm=false" in overrides and "moe_gate_offset=false" in overrides


def _fork_blocks(model):
	blocks = heads.moe_blocks(model)
	assert set(blocks) == {"dynamics", "reward"}
	return blocks


def test_fork_preset_builds_the_forks_structure_single_task(walker_cfg):
	from common.world_model import WorldModel
	cfg = walker_cfg(*FORK)
	model = WorldModel(cfg)
	blocks = _fork_blocks(model)
	assert not isinstance(model._pi, MoEBlock)
	for name, block in blocks.items():
		assert (block.n_experts, block.top_k) == (4, 4)
		assert block.options.shared_head and block.options.orthogonal and block.options.balance == "kl" and block.options.aux_coef == 0.03
		assert block.gate.in_features == block.in_dim and block.options.gate_dims is None
		assert float(block.router.adaptive_temperature.tau) == pytest.approx(1.8)
		assert block.router.adaptive_temperature.target == pytest.approx(0.75 * math.log(4))
		# frozen for max(5000, 5% of steps) of the head's own training forwards, as the fork's freeze_steps
		assert block.router.adaptive_temperature.freeze == 5000
		assert block[-1].weight.dim() == 2 and block[-1].norm  # the shared output layer, a NormedLinear
		assert block.options.gate_offset
	assert isinstance(blocks["reward"][-1].act, torch.nn.Mish)
	# counted in updates instead, the dynamics head's freeze is horizon of its forwards per update
	updates = heads.moe_blocks(WorldModel(walker_cfg(*FORK, "moe_temperature_freeze_unit=updates")))
	assert updates["dynamics"].router.adaptive_temperature.freeze == 5000 * cfg.horizon
	assert updates["reward"].router.adaptive_temperature.freeze == 5000
	# upstream zero-initialises the reward head's last layer: with a shared head that is the shared layer
	assert torch.count_nonzero(blocks["reward"][-1].weight) == 0


def test_fork_preset_agent_updates_and_plans(walker_cfg, make_buffer):
	from tdmpc2 import TDMPC2
	cfg = walker_cfg(*FORK, "moe_temperature_freeze=1")
	torch.manual_seed(0)
	agent = TDMPC2(cfg)
	buffer = make_buffer(cfg)
	taus = []
	for _ in range(20):
		info = agent.update(buffer)
		taus.append(float(agent.model._dynamics.router.adaptive_temperature.tau))
	assert all(torch.isfinite(info[k]) for k in ("total_loss", "moe_aux_loss", "moe_entropy"))
	assert taus[0] != taus[-1] and all(0.5 <= t <= 2.0 for t in taus)
	stats = agent.gate_stats()
	assert float(stats["dynamics"]["temperature"]) == pytest.approx(taus[-1])
	action = agent.act(torch.randn(24), t0=True)
	assert action.shape == (6,) and torch.isfinite(action).all()


def test_checkpoint_names_the_fork_setting_it_disagrees_on(walker_cfg, tmp_path):
	from tdmpc2 import TDMPC2
	path = tmp_path / "fork.pt"
	TDMPC2(walker_cfg(*FORK)).save(path)
	saved = torch.load(path, weights_only=True)["moe"]
	assert saved["moe_orthogonal"] is True and saved["moe_balance"] == "kl"
	restored = TDMPC2(walker_cfg(*FORK))
	restored.load(path)
	torch.testing.assert_close(restored.model._dynamics.router.adaptive_temperature.tau, torch.tensor(1.8))
	with pytest.raises(ValueError, match=r"moe_orthogonal=true.*moe_orthogonal=false"):
		TDMPC2(walker_cfg(*FORK, "moe_orthogonal=false")).load(path)


def _multitask_cfg(walker_cfg, *overrides):
	"""An mt30 config shaped as upstream's make_multitask_env would leave it, without building 30 environments."""
	cfg = walker_cfg("task=mt30", *overrides)
	n = len(cfg.tasks)
	cfg.obs_shape = {"state": (24,)}
	cfg.action_dim = 6
	cfg.action_dims = [6 if i % 2 else 4 for i in range(n)]
	cfg.episode_lengths = [500] * n
	cfg.episode_length = 500
	return cfg


def test_fork_preset_on_a_multitask_agent_gates_on_the_task_embedding(walker_cfg, make_buffer):
	from tdmpc2 import TDMPC2
	cfg = _multitask_cfg(walker_cfg, *FORK)
	assert cfg.multitask and cfg.task_dim > 0
	torch.manual_seed(0)
	agent = TDMPC2(cfg)
	for block in _fork_blocks(agent.model).values():
		assert block.options.gate_dims == (cfg.latent_dim, cfg.latent_dim + cfg.task_dim)
		assert block.gate.in_features == cfg.task_dim
	# the gate of a task-gated head sees only the embedding: changing z or a leaves the routing as it is
	dyn = agent.model._dynamics
	z, a = torch.randn(5, cfg.latent_dim), torch.rand(5, cfg.action_dim)
	task = torch.tensor([3, 3, 3, 3, 3])
	inputs = [torch.cat([agent.model.task_emb(zz, task), a], -1) for zz in (z, z + 1)]
	routes = [dyn.route(x.reshape(-1, dyn.in_dim)).weights for x in inputs]
	torch.testing.assert_close(routes[0], routes[1])
	obs = torch.randn(24)
	action = agent.act(obs, t0=True, task=3)
	assert action.shape == (6,) and torch.isfinite(action).all()
