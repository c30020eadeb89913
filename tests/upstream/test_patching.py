"""patch()/unpatch(): what changes in TD-MPC2, and that it all comes back."""
import os
import subprocess
import sys
import types

import pytest
import torch
import torch.nn as nn

from tdmpc2_moe.upstream import heads, patching
from tdmpc2_moe.block.moe import MoEBlock
from tdmpc2_moe.settings import MoESettings


def test_unknown_setting_and_bad_patch_keyword_raise(unpatched):
	with pytest.raises(ValueError, match="moe_expert"):
		MoESettings.resolve(moe_expert=4)
	with pytest.raises(ValueError, match="moe_top_k"):
		patching.patch(moe_top_k=0)
	assert not patching.is_patched()


def _patchable(tdmpc2_root):
	import common.layers as layers
	from common.buffer import Buffer
	from common.scale import RunningScale
	from common.world_model import WorldModel
	from tdmpc2 import TDMPC2
	from trainer.online_trainer import OnlineTrainer
	return {
		(layers, "mlp"): layers.mlp, (WorldModel, "__init__"): WorldModel.__init__,
		(WorldModel, "soft_update_target_Q"): WorldModel.soft_update_target_Q,
		(RunningScale, "__init__"): RunningScale.__init__, (Buffer, "__init__"): Buffer.__init__,
		(Buffer, "_init"): Buffer._init, (TDMPC2, "__init__"): TDMPC2.__init__, (TDMPC2, "_update"): TDMPC2._update,
		(TDMPC2, "update"): TDMPC2.update, (TDMPC2, "save"): TDMPC2.save, (TDMPC2, "load"): TDMPC2.load,
		(OnlineTrainer, "__init__"): OnlineTrainer.__init__,
	}


def test_patch_is_idempotent_and_unpatch_restores_every_original(tdmpc2_root, unpatched):
	originals = _patchable(tdmpc2_root)
	patching.patch(use_moe=True)
	patched = {key: getattr(*key) for key in originals}
	assert all(patched[key] is not originals[key] for key in originals)
	import common.layers as layers
	from tdmpc2 import TDMPC2
	assert layers.MoEBlock is MoEBlock and callable(TDMPC2.gate_stats)
	patching.patch(moe_experts=8)
	assert all(getattr(*key) is patched[key] for key in originals), "a second patch() must not wrap twice"
	assert patching.is_patched()
	patching.unpatch()
	assert all(getattr(*key) is originals[key] for key in originals)
	assert not hasattr(layers, "MoEBlock") and not hasattr(TDMPC2, "gate_stats")
	assert not patching.is_patched()
	patching.unpatch()


def test_moe_heads_are_moe_blocks_and_the_rest_is_upstream(walker_cfg):
	import common.layers as layers
	from common.world_model import WorldModel
	model = WorldModel(walker_cfg("use_moe=true", "moe_heads=[encoder,dynamics,pi]", "moe_experts=3"))
	assert isinstance(model._encoder["state"], MoEBlock) and isinstance(model._dynamics, MoEBlock)
	assert isinstance(model._pi, MoEBlock) and model._pi.n_experts == 3
	assert isinstance(model._reward, nn.Sequential)
	assert isinstance(model._reward[0], layers.NormedLinear) and isinstance(model._reward[-1], nn.Linear)
	assert not any(isinstance(m, MoEBlock) for m in model._Qs.modules())
	# Upstream's zero-init of the reward head keeps its meaning for every expert.
	reward_moe = WorldModel(walker_cfg("use_moe=true", "moe_heads=[reward]"))
	assert torch.count_nonzero(reward_moe._reward[-1].weight) == 0


def test_use_moe_false_builds_upstream_model(walker_cfg):
	from common.world_model import WorldModel
	model = WorldModel(walker_cfg())
	assert not any(isinstance(m, MoEBlock) for m in model.modules())
	assert heads.moe_blocks(model) == {}


def test_unpatch_restores_plain_world_model(walker_cfg):
	from common.world_model import WorldModel
	cfg = walker_cfg("use_moe=true")
	assert heads.moe_blocks(WorldModel(cfg))
	patching.unpatch()
	model = WorldModel(cfg)
	assert not any(isinstance(m, MoEBlock) for m in model.modules())


def test_compiled_update_is_the_patched_function(walker_cfg):
	from tdmpc2 import TDMPC2
	agent = TDMPC2(walker_cfg("use_moe=true", "compile=true"))
	compiled = agent._update
	assert compiled._torchdynamo_orig_callable.__func__ is TDMPC2.__dict__["_update"]
	assert TDMPC2.__dict__["_update"] is not patching.original_of(TDMPC2, "_update")


def test_patch_before_upstream_import_patches_on_import(tdmpc2_root):
	code = (
		"import tdmpc2_moe.upstream.patching as p, tdmpc2_moe.upstream.checkout as u, sys\n"
		"u.activate()\n"
		"p.patch(use_moe=True)\n"
		"assert 'common.layers' not in sys.modules\n"
		"from tdmpc2 import TDMPC2\n"
		"import common.layers as layers\n"
		"assert layers.MoEBlock is p.MoEBlock and hasattr(TDMPC2, 'gate_stats')\n"
		"p.unpatch()\n"
		"assert not hasattr(layers, 'MoEBlock') and not hasattr(TDMPC2, 'gate_stats')\n"
		"print('ok')\n")
	env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
	out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
	assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


class _ActionSpaceEnv:
	"""Just what OnlineTrainer.__init__ and rand_act touch: a gymnasium action space."""

	def __init__(self):
		import gymnasium as gym
		self.action_space = gym.spaces.Box(-1.0, 1.0, (6,))

	def rand_act(self):
		return torch.from_numpy(self.action_space.sample())


def _seed_phase_actions(cfg, trainer_init):
	from trainer.online_trainer import OnlineTrainer
	trainer = OnlineTrainer.__new__(OnlineTrainer)
	agent = types.SimpleNamespace(model="(no model: the trainer only prints it)")
	trainer_init(trainer, cfg=cfg, env=_ActionSpaceEnv(), agent=agent, buffer=None, logger=None)
	return torch.stack([trainer.env.rand_act() for _ in range(5)])


def test_online_trainer_seeds_the_action_space_with_the_runs_seed(walker_cfg):
	# The cause of two identical runs differing (docs/long_runs.md "Reproducible runs"): upstream's set_seed
	# leaves gymnasium's action space unseeded, so the seed phase's random actions came from OS entropy.
	from trainer.online_trainer import OnlineTrainer
	cfg, other = walker_cfg("seed=3"), walker_cfg("seed=4")
	first = _seed_phase_actions(cfg, OnlineTrainer.__init__)
	assert torch.equal(first, _seed_phase_actions(cfg, OnlineTrainer.__init__))
	assert not torch.equal(first, _seed_phase_actions(other, OnlineTrainer.__init__))
	# Negative control: upstream's own constructor gives other actions each time.
	upstream_init = patching.original_of(OnlineTrainer, "__init__")
	assert upstream_init is not OnlineTrainer.__init__
	assert not torch.equal(_seed_phase_actions(cfg, upstream_init), _seed_phase_actions(cfg, upstream_init))
