"""
What `patch()` changes in an unmodified TD-MPC2 checkout, and nothing else.

- `common.layers`: `mlp` becomes MoE-aware and `MoEBlock` is exposed there. While a `WorldModel`
  is being built with `use_moe`, each `mlp` call finds out which head it builds from its caller:
  `layers.enc` builds the "encoder", and a `self._<head> = layers.mlp(...)` line in
  `WorldModel.__init__` builds `<head>`. Heads named in `moe_heads` become `MoEBlock`s; every
  other call (Q-functions included) is upstream's `mlp`, untouched. The result is checked after
  construction, so a head that could not be identified raises instead of silently staying plain.
- `WorldModel.__init__`: the above, plus `moe_init_experts` / `moe_freeze_experts`.
  `WorldModel.soft_update_target_Q`: also computes the update's MoE metrics (see below).
- `TDMPC2`: `__init__` (device, `memory_monitor`, `deterministic=true`: determinism.py), `_update` (MoE metrics as tensors, computed in
  the compiled graph that ends upstream's `_update`, so the plugin adds no graph; patched at class
  level, so `compile=true` compiles the patched function), `update` (steps the monitor and the
  gate snapshots, outside the compiled region), `save` / `load` (MoE settings next to the weights), and the new
  `clear_gate_history()` / `gate_stats()`.
- `RunningScale.__init__`, `Buffer.__init__` / `Buffer._init`: run on `device` (see device.torch_on).
- `envs.make_env`: also builds the plugin's task families (HumanoidBench `humanoid_<id>`, any Gymnasium
  id `gym:<id>`), single-task and inside upstream's multitask wrapper, and turns what cannot run into
  one line naming the task (families/make.py). `envs.wrappers.timeout.Timeout.max_episode_steps`: a
  property upstream's MyoSuite, Meta-World and ManiSkill code can assign, as it does.
- `common.parser.parse_cfg`: honours an explicit `tasks=[...]`, a multitask agent over those tasks
  (families/task_sets.py).
- `OnlineTrainer.__init__`: seeds the environment's action space with `cfg.seed`. Upstream's
  `set_seed` seeds python, numpy and torch but not gymnasium's action space, whose `sample()` (the
  seed phase's random actions) then draws from OS entropy: the one source that made two runs of the
  same command differ (docs/long_runs.md "Reproducible runs").

Modules not imported yet are patched as they are imported (the import hook of `_hooks.py`), so `patch()`
may come before or after `import tdmpc2`. `unpatch()` puts every original object back.
"""
import functools
import os
import sys

import torch

from . import _hooks, determinism
from ..settings.config_keys import check_checkpoint
from .device import torch_on
from ..analysis.gate_snapshots import GateSnapshots
from .heads import (block_options, built_heads, freeze_experts, head_of_caller, init_experts, moe_blocks,
					moe_metrics)
from ..block.moe import MoEBlock
from ..analysis.monitor import MemoryMonitor
from ..settings.record import MoESettings
from .checkout import PINNED_COMMIT
from ..families.make import patched_make_env
from ..families.task_sets import patched_parse_cfg
from ..families.upstream_families import settable_max_episode_steps

# (settings, cfg) of the WorldModel under construction when it uses MoE, else None (construction is
# single-threaded).
_building = None


def _moe_mlp(original):
	@functools.wraps(original)
	def mlp(in_dim, mlp_dims, out_dim, act=None, dropout=0.):
		head = head_of_caller(sys._getframe(1)) if _building is not None else None
		if head is not None and head in _building[0].moe_heads:
			settings, cfg = _building
			return MoEBlock(in_dim, mlp_dims, out_dim, act, dropout, options=block_options(settings, head, in_dim, cfg))
		return original(in_dim, mlp_dims, out_dim, act, dropout)
	return mlp


def _world_model_init(original):
	@functools.wraps(original)
	def __init__(self, cfg):
		global _building
		settings = MoESettings.resolve(cfg, **_state["keywords"])
		previous, _building = _building, ((settings, cfg) if settings.use_moe else None)
		try:
			original(self, cfg)
		finally:
			_building = previous
		self.moe_settings = settings
		# Filled by soft_update_target_Q at the end of each update (see _world_model_soft_update).
		self.moe_latest_metrics = {}
		if not settings.use_moe:
			return
		built = moe_blocks(self)
		missing = [h for h in settings.moe_heads if h in built_heads(self) and h not in built]
		if missing:
			raise RuntimeError(f"could not make heads {missing} MoE: their layers.mlp calls were not recognised "
							   f"in this TD-MPC2 version (expected at commit {PINNED_COMMIT})")
		if settings.moe_init_experts:
			init_experts(self, settings.moe_init_experts)
		if settings.moe_freeze_experts:
			freeze_experts(self)
	return __init__


def _agent_init(original, module):
	@functools.wraps(original)
	def __init__(self, cfg):
		settings = MoESettings.resolve(cfg, **_state["keywords"])
		determinism.apply(settings.deterministic)
		with torch_on(module, settings.device):
			original(self, cfg)
		interval = settings.monitor_mem_interval
		self.memory_monitor = MemoryMonitor(interval=interval, device=self.device) if interval else None
		interval = settings.gate_snapshot_interval
		self.gate_snapshots = None
		if interval and settings.use_moe:
			self.gate_snapshots = GateSnapshots(interval, os.path.join(str(cfg.work_dir), "gates"))
	return __init__


def _world_model_soft_update(original):
	@functools.wraps(original)
	def soft_update_target_Q(self):
		original(self)
		# Upstream's _update calls this once, after the update's last forward and in the same compiled
		# graph as _update's closing code, so the metrics computed here join that graph. Computed after
		# `original(...)` returns in the _update wrapper, they would need a graph of their own: the graph
		# breaks inside upstream's _update (Q ensemble, backward, optimizer) end dynamo's graph there.
		self.moe_latest_metrics.update(moe_metrics(self, self.cfg.batch_size))
	return soft_update_target_Q


def _agent_update_inner(original):
	@functools.wraps(original)
	def _update(self, *args, **kwargs):
		latest = self.model.moe_latest_metrics
		latest.clear()
		info = original(self, *args, **kwargs)
		# Only dict operations here: a tensor op after `original` would add a compiled graph.
		if not latest and moe_blocks(self.model):
			raise RuntimeError("MoE metrics were not computed: upstream's _update did not call "
							   f"WorldModel.soft_update_target_Q (expected at commit {PINNED_COMMIT})")
		info.update(latest)
		return info
	return _update


def _agent_update(original):
	@functools.wraps(original)
	def update(self, buffer):
		info = original(self, buffer)
		monitor = getattr(self, "memory_monitor", None)
		if monitor is not None:
			monitor.step()
			if monitor.steps % monitor.interval == 0:
				monitor.report()
		snapshots = getattr(self, "gate_snapshots", None)
		if snapshots is not None:
			snapshots.step({h: b for h, b in moe_blocks(self.model).items() if b.history is not None})
		return info
	return update


def checkpoint_of(model):
	"""Returns what a patched agent's `save` writes for its world model `model`: its state dict and its MoE settings."""
	return {"model": model.state_dict(), "moe": model.moe_settings.checkpoint_dict()}


def _agent_save(original):
	@functools.wraps(original)
	def save(self, fp):
		torch.save(checkpoint_of(self.model), fp)
	return save


def _agent_load(original):
	@functools.wraps(original)
	def load(self, fp):
		state = fp if isinstance(fp, dict) else torch.load(fp, map_location=torch.get_default_device(), weights_only=True)
		check_checkpoint(state, self.model.moe_settings)
		return original(self, state)
	return load


def clear_gate_history(self):
	"""Forgets the recorded gate weights of every MoE head (the rings keep their storage)."""
	for block in moe_blocks(self.model).values():
		if block.history is not None:
			block.history.clear()


def gate_stats(self):
	"""Returns {head name: MoEBlock.stats()} (device tensors) for every MoE head of the agent."""
	return {name: block.stats() for name, block in moe_blocks(self.model).items()}


def _init_on_device(original, module):
	@functools.wraps(original)
	def __init__(self, cfg, *args, **kwargs):
		with torch_on(module, MoESettings.resolve(cfg, **_state["keywords"]).device):
			original(self, cfg, *args, **kwargs)
	return __init__


def _method_on_device(original, module):
	@functools.wraps(original)
	def method(self, *args, **kwargs):
		with torch_on(module, MoESettings.resolve(self.cfg, **_state["keywords"]).device):
			return original(self, *args, **kwargs)
	return method


def _trainer_init(original):
	@functools.wraps(original)
	def __init__(self, *args, **kwargs):
		original(self, *args, **kwargs)
		self.env.action_space.seed(int(self.cfg.seed))
	return __init__


_state = {"patched": False, "keywords": {}, "log": _hooks.SetattrLog(), "hook": None}


def _set(owner, name, value):
	_state["log"].set(owner, name, value)


def _patch_layers(module):
	if not (callable(getattr(module, "mlp", None)) and hasattr(module, "enc")):
		return
	_set(module, "mlp", _moe_mlp(module.mlp))
	_set(module, "MoEBlock", MoEBlock)


def _patch_world_model(module):
	cls = getattr(module, "WorldModel", None)
	if isinstance(cls, type):
		_set(cls, "__init__", _world_model_init(cls.__init__))
		_set(cls, "soft_update_target_Q", _world_model_soft_update(cls.soft_update_target_Q))


def _patch_scale(module):
	cls = getattr(module, "RunningScale", None)
	if isinstance(cls, type):
		_set(cls, "__init__", _init_on_device(cls.__init__, module))


def _patch_buffer(module):
	cls = getattr(module, "Buffer", None)
	if isinstance(cls, type) and hasattr(cls, "_init"):
		_set(cls, "__init__", _init_on_device(cls.__init__, module))
		_set(cls, "_init", _method_on_device(cls._init, module))


def _patch_agent(module):
	cls = getattr(module, "TDMPC2", None)
	if not (isinstance(cls, type) and hasattr(cls, "_update")):
		return
	_set(cls, "__init__", _agent_init(cls.__init__, module))
	_set(cls, "_update", _agent_update_inner(cls._update))
	_set(cls, "update", _agent_update(cls.update))
	_set(cls, "save", _agent_save(cls.save))
	_set(cls, "load", _agent_load(cls.load))
	_set(cls, "clear_gate_history", clear_gate_history)
	_set(cls, "gate_stats", gate_stats)


def _patch_online_trainer(module):
	cls = getattr(module, "OnlineTrainer", None)
	if isinstance(cls, type):
		_set(cls, "__init__", _trainer_init(cls.__init__))


def _patch_envs(module):
	if callable(getattr(module, "make_env", None)) and callable(getattr(module, "make_multitask_env", None)):
		_set(module, "make_env", patched_make_env(module.make_env))


def _patch_timeout(module):
	cls = getattr(module, "Timeout", None)
	if isinstance(cls, type) and isinstance(cls.__dict__.get("max_episode_steps"), property):
		_set(cls, "max_episode_steps", settable_max_episode_steps())


def _patch_parser(module):
	if callable(getattr(module, "parse_cfg", None)) and isinstance(getattr(module, "TASK_SET", None), dict):
		_set(module, "parse_cfg", patched_parse_cfg(module.parse_cfg, module.TASK_SET))


_PATCHERS = {"common.layers": _patch_layers, "common.world_model": _patch_world_model,
			 "common.scale": _patch_scale, "common.buffer": _patch_buffer, "tdmpc2": _patch_agent,
			 "trainer.online_trainer": _patch_online_trainer,
			 "envs": _patch_envs, "envs.wrappers.timeout": _patch_timeout, "common.parser": _patch_parser}


def patch(**settings):
	"""
	Patches TD-MPC2 (see the module docstring) with `settings` (MoESettings keys; a TD-MPC2 cfg key
	of the same name wins at construction). Idempotent: a second call only replaces the settings.
	Returns the resolved keyword settings. Raises ValueError naming a bad or unknown key.
	"""
	resolved = MoESettings.resolve(None, **settings)
	_state["keywords"] = dict(settings)
	if _state["patched"]:
		return resolved
	_state["patched"] = True
	for name, patcher in _PATCHERS.items():
		if name in sys.modules:
			patcher(sys.modules[name])
	_state["hook"] = _hooks.PatchOnImport(_PATCHERS, is_patched)
	_state["hook"].install()
	return resolved


def unpatch():
	"""Restores every object patch() replaced (and removes what it added). No-op when not patched."""
	if not _state["patched"]:
		return
	_state["hook"].remove()
	_state["log"].undo()
	_state.update(patched=False, keywords={}, hook=None)


def is_patched():
	"""Returns True between patch() and unpatch()."""
	return _state["patched"]


def original_of(owner, name):
	"""Returns the upstream object that patch() replaced at `owner.name` (the current one when not patched)."""
	return _state["log"].original(owner, name)
