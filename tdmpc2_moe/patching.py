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
- `TDMPC2`: `__init__` (device, `memory_monitor`), `_update` (MoE metrics as tensors, computed in
  the compiled graph that ends upstream's `_update`, so the plugin adds no graph; patched at class
  level, so `compile=true` compiles the patched function), `update` (steps the monitor,
  outside the compiled region), `save` / `load` (MoE settings next to the weights), and the new
  `clear_gate_history()` / `gate_stats()`.
- `RunningScale.__init__`, `Buffer.__init__` / `Buffer._init`: run on `device` (see upstream.torch_on).

Modules not imported yet are patched as they are imported (a `sys.meta_path` hook), so `patch()`
may come before or after `import tdmpc2`. `unpatch()` puts every original object back.
"""
import dataclasses
import functools
import importlib.abc
import linecache
import re
import sys

import torch

from .checks import check_int, check_number
from .moe import MoEBlock
from .monitor import MemoryMonitor
from .upstream import PINNED_COMMIT, resolve_device, torch_on

HEADS = ("encoder", "dynamics", "reward", "termination", "pi")
# Checkpoint keys of upstream's plain head `<prefix>.<layer>.<name>` for each MoE head.
_HEAD_PREFIX = {"encoder": "_encoder.state", "dynamics": "_dynamics", "reward": "_reward",
				"termination": "_termination", "pi": "_pi"}
# Settings that decide the shapes of the world model's parameters: a checkpoint must match them.
_ARCHITECTURE = ("use_moe", "moe_experts", "moe_heads")


def _fail(key, expected, value):
	raise ValueError(f"{key} must be {expected}, got {value!r}")


def _as_bool(key, value):
	if not isinstance(value, bool):
		_fail(key, "true or false", value)
	return value


def _as_names(key, value):
	if isinstance(value, str):
		value = [v.strip() for v in value.split(",") if v.strip()]
	try:
		names = tuple(value)
	except TypeError:
		_fail(key, "a list of strings", value)
	if not all(isinstance(n, str) for n in names):
		_fail(key, "a list of strings", value)
	return names


@dataclasses.dataclass(frozen=True)
class MoESettings:
	"""
	The plugin's settings, validated; build with `MoESettings.resolve(cfg, **keywords)`.
	Heads in `moe_heads` that the model does not build with `layers.mlp` (termination when not
	episodic, the encoder of pixel observations) stay upstream's. `gate_history_rows=0` keeps no gate
	history and `monitor_mem_interval=0` no memory monitor. `device=None` leaves upstream's cuda:0.
	"""
	use_moe: bool = False
	moe_experts: int = 4
	moe_top_k: int = 2
	moe_heads: tuple = ("dynamics", "reward", "pi")
	moe_temperature: float = 1.0
	moe_aux_coef: float = 0.01
	moe_zloss_coef: float = 0.0
	gate_history_rows: int = 65536
	monitor_mem_interval: int = 1000
	device: object = None
	moe_init_experts: tuple = ()
	moe_freeze_experts: bool = False
	# Long runs (checkpoint.py): write work_dir/checkpoints/latest.pt every N steps (0: never), with
	# the replay buffer or not, and continue from it.
	checkpoint_interval: int = 0
	checkpoint_buffer: bool = False
	resume: bool = False

	@classmethod
	def resolve(cls, cfg=None, **keywords):
		"""
		Returns the settings from `keywords` and TD-MPC2 `cfg` keys of the same names (a cfg value
		other than None wins). Raises ValueError naming the key for an unknown keyword or a bad value.
		"""
		names = [f.name for f in dataclasses.fields(cls)]
		unknown = sorted(set(keywords) - set(names))
		if unknown:
			raise ValueError(f"unknown setting {unknown[0]!r}; settings are {names}")
		raw = {name: getattr(cls, name) for name in names}
		raw.update(keywords)
		if cfg is not None:
			for name in names:
				value = cfg.get(name, None)
				if value is not None:
					raw[name] = value
		return cls._validated(raw)

	@classmethod
	def _validated(cls, raw):
		experts = check_int("moe_experts", raw["moe_experts"], 1, 1024)
		heads = _as_names("moe_heads", raw["moe_heads"])
		for name in heads:
			if name not in HEADS:
				raise ValueError(f"moe_heads: unknown head {name!r}; heads are {list(HEADS)}")
		paths = _as_names("moe_init_experts", raw["moe_init_experts"])
		if paths and len(paths) != experts:
			raise ValueError(f"moe_init_experts must name one checkpoint per expert (moe_experts={experts}), "
							 f"got {len(paths)}")
		return cls(
			use_moe=_as_bool("use_moe", raw["use_moe"]),
			moe_experts=experts,
			moe_top_k=check_int("moe_top_k", raw["moe_top_k"], 1, experts),
			moe_heads=tuple(dict.fromkeys(heads)),
			moe_temperature=check_number("moe_temperature", raw["moe_temperature"], positive=True),
			moe_aux_coef=check_number("moe_aux_coef", raw["moe_aux_coef"], positive=False),
			moe_zloss_coef=check_number("moe_zloss_coef", raw["moe_zloss_coef"], positive=False),
			gate_history_rows=check_int("gate_history_rows", raw["gate_history_rows"], 0),
			monitor_mem_interval=check_int("monitor_mem_interval", raw["monitor_mem_interval"], 0),
			device=resolve_device(raw["device"]),
			moe_init_experts=paths,
			moe_freeze_experts=_as_bool("moe_freeze_experts", raw["moe_freeze_experts"]),
			checkpoint_interval=check_int("checkpoint_interval", raw["checkpoint_interval"], 0),
			checkpoint_buffer=_as_bool("checkpoint_buffer", raw["checkpoint_buffer"]),
			resume=_as_bool("resume", raw["resume"]),
		)

	def block_kwargs(self):
		"""Returns the MoEBlock keyword arguments for these settings (gate_history_rows=0: no history)."""
		return dict(n_experts=self.moe_experts, top_k=self.moe_top_k, temperature=self.moe_temperature,
					aux_coef=self.moe_aux_coef, zloss_coef=self.moe_zloss_coef,
					history_rows=self.gate_history_rows or None)

	def checkpoint_dict(self):
		"""Returns the settings a checkpoint records, as plain Python types (loadable with weights_only=True)."""
		return dict(use_moe=self.use_moe, moe_experts=self.moe_experts, moe_top_k=self.moe_top_k,
					moe_heads=list(self.moe_heads), moe_temperature=self.moe_temperature,
					moe_aux_coef=self.moe_aux_coef, moe_zloss_coef=self.moe_zloss_coef)


def config_defaults():
	"""Returns {key: default} of the plugin's TD-MPC2 config keys (lists for sequences, None for null)."""
	out = {}
	for f in dataclasses.fields(MoESettings):
		out[f.name] = list(f.default) if isinstance(f.default, tuple) else f.default
	return out


def moe_blocks(model):
	"""Returns {head name: MoEBlock} for the MoE heads of a TD-MPC2 WorldModel, in HEADS order."""
	encoder = model._encoder["state"] if "state" in model._encoder else None
	heads = dict(encoder=encoder, dynamics=model._dynamics, reward=model._reward,
				 termination=model._termination, pi=model._pi)
	return {name: m for name, m in heads.items() if isinstance(m, MoEBlock)}


def _built_heads(model):
	"""Returns the names of the heads upstream built with `layers.mlp` in this model."""
	names = ["dynamics", "reward", "pi"]
	if "state" in model._encoder:
		names.append("encoder")
	if model._termination is not None:
		names.append("termination")
	return names


_ASSIGNMENT = re.compile(r"^\s*self\._(\w+)\s*=")


def _head_of_caller(frame):
	"""Returns the head name that the `mlp` call in `frame` builds, or None when it is not a MoE-able head."""
	if frame.f_code.co_name == "enc":
		return "encoder"
	match = _ASSIGNMENT.match(linecache.getline(frame.f_code.co_filename, frame.f_lineno))
	return match.group(1) if match and match.group(1) in HEADS else None


# Settings of the WorldModel under construction when it uses MoE, else None (construction is single-threaded).
_building = None


def _moe_mlp(original):
	@functools.wraps(original)
	def mlp(in_dim, mlp_dims, out_dim, act=None, dropout=0.):
		settings = _building
		if settings is not None and _head_of_caller(sys._getframe(1)) in settings.moe_heads:
			return MoEBlock(in_dim, mlp_dims, out_dim, act, dropout, **settings.block_kwargs())
		return original(in_dim, mlp_dims, out_dim, act, dropout)
	return mlp


def _load_checkpoint(path):
	"""Returns the checkpoint dict at `path` (torch.load on the CPU, weights_only=True)."""
	return torch.load(path, map_location="cpu", weights_only=True)


def init_experts(model, paths):
	"""
	Copies, for every MoE head of `model`, the Linear/LayerNorm parameters of the same head of plain
	TD-MPC2 checkpoint `paths[i]` into expert i. Raises ValueError naming moe_init_experts when a
	checkpoint is MoE, lacks the head, or its shapes differ.
	"""
	blocks = moe_blocks(model)
	with torch.no_grad():
		for i, path in enumerate(paths):
			ckpt = _load_checkpoint(path)
			if ckpt.get("moe", {}).get("use_moe"):
				raise ValueError(f"moe_init_experts[{i}] = {path} is a MoE checkpoint; expert init needs plain TD-MPC2 ones")
			state = ckpt.get("model", ckpt)
			for name, block in blocks.items():
				for j, layer in enumerate(block.layers):
					pairs = [("weight", "weight"), ("bias", "bias")]
					if layer.norm:
						pairs += [("ln_weight", "ln.weight"), ("ln_bias", "ln.bias")]
					for attr, suffix in pairs:
						key = f"{_HEAD_PREFIX[name]}.{j}.{suffix}"
						target = getattr(layer, attr)[i]
						if key not in state or state[key].shape != target.shape:
							found = tuple(state[key].shape) if key in state else "missing"
							raise ValueError(f"moe_init_experts[{i}] = {path}: {key} is {found}, "
											 f"expert needs {tuple(target.shape)}")
						target.copy_(state[key])


def freeze_experts(model):
	"""Stops gradients to every expert parameter of the MoE heads of `model`; the gates keep training."""
	for block in moe_blocks(model).values():
		for p in block.layers.parameters():
			p.requires_grad_(False)


def _world_model_init(original):
	@functools.wraps(original)
	def __init__(self, cfg):
		global _building
		settings = MoESettings.resolve(cfg, **_state["keywords"])
		previous, _building = _building, (settings if settings.use_moe else None)
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
		missing = [h for h in settings.moe_heads if h in _built_heads(self) and h not in built]
		if missing:
			raise RuntimeError(f"could not make heads {missing} MoE: their layers.mlp calls were not recognised "
							   f"in this TD-MPC2 version (expected at commit {PINNED_COMMIT})")
		if settings.moe_init_experts:
			init_experts(self, settings.moe_init_experts)
		if settings.moe_freeze_experts:
			freeze_experts(self)
	return __init__


def recent_routing(block, rows):
	"""
	Returns {entropy: mean routing entropy, max_load: largest share of routing slots} over the
	latest `rows` gate rows of `block` (device tensors, no host sync). Reading a few rows back from
	the ring costs microseconds; statistics over the whole ring would cost a large part of an update.
	Without a ring (gate_history_rows=0) the block's latest-batch statistics are returned.
	"""
	stats = block.stats() if block.history is None else block.history.stats(last=rows)
	return {"entropy": stats["entropy"], "max_load": stats["max_load"]}


def moe_metrics(model, rows):
	"""
	Returns {moe_aux_loss: summed aux loss of each head's latest forward, moe_entropy: mean routing
	entropy, moe_max_load: largest expert usage share, both over each head's latest `rows` gate rows}
	as device tensors, or {} when the model has no MoE head.
	"""
	blocks = list(moe_blocks(model).values())
	if not blocks:
		return {}
	recent = [recent_routing(b, rows) for b in blocks]
	return {
		"moe_aux_loss": torch.stack([b.last_aux_loss for b in blocks]).sum(),
		"moe_entropy": torch.stack([r["entropy"] for r in recent]).mean(),
		"moe_max_load": torch.stack([r["max_load"] for r in recent]).max(),
	}


def describe(settings):
	"""Returns a one-line description of checkpoint settings (a checkpoint_dict, or None for plain)."""
	if not settings or not settings.get("use_moe"):
		return "plain TD-MPC2 (use_moe=false)"
	return f"use_moe=true moe_experts={settings['moe_experts']} moe_heads={list(settings['moe_heads'])}"


def check_checkpoint(state, settings):
	"""Raises ValueError naming both sides when checkpoint `state` was saved with other MoE architecture settings."""
	saved = state.get("moe") if isinstance(state, dict) else None
	mine = settings.checkpoint_dict()
	saved_arch = {k: saved.get(k) for k in _ARCHITECTURE} if saved else {"use_moe": False}
	if not saved_arch["use_moe"] and not mine["use_moe"]:
		return
	if saved_arch.get("use_moe") != mine["use_moe"] or any(saved_arch[k] != mine[k] for k in _ARCHITECTURE[1:]):
		raise ValueError(f"checkpoint was saved with {describe(saved)}, but this agent has {describe(mine)}")


def _agent_init(original, module):
	@functools.wraps(original)
	def __init__(self, cfg):
		settings = MoESettings.resolve(cfg, **_state["keywords"])
		with torch_on(module, settings.device):
			original(self, cfg)
		interval = settings.monitor_mem_interval
		self.memory_monitor = MemoryMonitor(interval=interval, device=self.device) if interval else None
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
		return info
	return update


def _agent_save(original):
	@functools.wraps(original)
	def save(self, fp):
		torch.save({"model": self.model.state_dict(), "moe": self.model.moe_settings.checkpoint_dict()}, fp)
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


_MISSING = object()
_state = {"patched": False, "keywords": {}, "undo": [], "hook": None}


def _set(owner, name, value):
	_state["undo"].append((owner, name, owner.__dict__.get(name, _MISSING)))
	setattr(owner, name, value)


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


_PATCHERS = {"common.layers": _patch_layers, "common.world_model": _patch_world_model,
			 "common.scale": _patch_scale, "common.buffer": _patch_buffer, "tdmpc2": _patch_agent}


class _PatchOnImport(importlib.abc.MetaPathFinder):
	"""Finds upstream modules with the other finders and patches them right after they execute."""

	def find_spec(self, name, path, target=None):
		if name not in _PATCHERS:
			return None
		for finder in sys.meta_path:
			if finder is self or not hasattr(finder, "find_spec"):
				continue
			spec = finder.find_spec(name, path, target)
			if spec is not None and spec.loader is not None:
				spec.loader = _PatchingLoader(spec.loader, name)
				return spec
		return None


class _PatchingLoader(importlib.abc.Loader):
	def __init__(self, loader, name):
		self._loader, self._name = loader, name

	def create_module(self, spec):
		return self._loader.create_module(spec)

	def exec_module(self, module):
		self._loader.exec_module(module)
		if _state["patched"]:
			_PATCHERS[self._name](module)

	def __getattr__(self, name):
		return getattr(self._loader, name)


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
	_state["hook"] = _PatchOnImport()
	sys.meta_path.insert(0, _state["hook"])
	return resolved


def unpatch():
	"""Restores every object patch() replaced (and removes what it added). No-op when not patched."""
	if not _state["patched"]:
		return
	sys.meta_path.remove(_state["hook"])
	_state["hook"] = None
	for owner, name, original in reversed(_state["undo"]):
		if original is _MISSING:
			delattr(owner, name)
		else:
			setattr(owner, name, original)
	_state.update(patched=False, keywords={}, undo=[])


def is_patched():
	"""Returns True between patch() and unpatch()."""
	return _state["patched"]


def original_of(owner, name):
	"""Returns the upstream object that patch() replaced at `owner.name` (the current one when not patched)."""
	for o, n, value in _state["undo"]:
		if o is owner and n == name and value is not _MISSING:
			return value
	return getattr(owner, name)
