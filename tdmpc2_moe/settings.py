"""
The plugin's settings (`MoESettings`): names, defaults, validation, how a TD-MPC2 cfg overrides
them, the config keys they add, and which of them a checkpoint must match.

This is the bottom of the package's Python layers: it imports nothing of the package but
`checks.py`, so every other module (and `upstream.py`, which adds these keys to upstream's config)
can import it without a circle.
"""
import dataclasses

import torch

from .checks import check_int, check_number

# The world-model heads that upstream builds with `layers.mlp` and that can become MoE.
HEADS = ("encoder", "dynamics", "reward", "termination", "pi")
# Settings that decide the shapes of the world model's parameters: a checkpoint must match them.
ARCHITECTURE = ("use_moe", "moe_experts", "moe_heads")


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


def resolve_device(device):
	"""Returns `device` as a torch.device, or None for None (upstream's own 'cuda:0'). Raises ValueError naming `device`."""
	if device is None or isinstance(device, torch.device):
		return device
	try:
		return torch.device(device)
	except (RuntimeError, TypeError) as exc:
		raise ValueError(f"device must be None or a torch device string like 'cpu' or 'cuda:0', got {device!r}") from exc


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


def describe(settings):
	"""Returns a one-line description of checkpoint settings (a checkpoint_dict, or None for plain)."""
	if not settings or not settings.get("use_moe"):
		return "plain TD-MPC2 (use_moe=false)"
	values = [f"{k}={list(settings[k]) if isinstance(settings[k], (list, tuple)) else settings[k]}"
			  for k in ARCHITECTURE[1:]]
	return " ".join(["use_moe=true", *values])


def check_checkpoint(state, settings):
	"""Raises ValueError naming both sides when checkpoint `state` was saved with other MoE architecture settings."""
	saved = state.get("moe") if isinstance(state, dict) else None
	mine = settings.checkpoint_dict()
	saved_arch = {k: saved.get(k) for k in ARCHITECTURE} if saved else {"use_moe": False}
	if not saved_arch["use_moe"] and not mine["use_moe"]:
		return
	if saved_arch.get("use_moe") != mine["use_moe"] or any(saved_arch[k] != mine[k] for k in ARCHITECTURE[1:]):
		raise ValueError(f"checkpoint was saved with {describe(saved)}, but this agent has {describe(mine)}")
