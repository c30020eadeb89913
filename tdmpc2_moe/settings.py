"""
The plugin's settings (`MoESettings`): names, defaults, validation, how a TD-MPC2 cfg overrides
them, the config keys they add, and which of them a checkpoint must match.

This is the bottom of the package's Python layers: it imports nothing of the package but
`checks.py`, so every other module (and `upstream.py`, which adds these keys to upstream's config)
can import it without a circle.
"""
import dataclasses
import math

import torch

from .checks import DISPATCHES, check_int, check_number

# The world-model heads that upstream builds with `layers.mlp` and that can become MoE.
HEADS = ("encoder", "dynamics", "reward", "termination", "pi")
# Settings that decide the shapes or the meaning of the world model's parameters: a checkpoint must
# match them (a checkpoint saved before a setting existed has its default).
ARCHITECTURE = ("use_moe", "moe_experts", "moe_heads", "moe_shared_head", "moe_orthogonal", "moe_balance",
				"moe_gate_input", "moe_last_norm", "moe_gate_offset", "moe_expert_dim")
BALANCES = ("switch", "kl")
GATE_INPUTS = ("input", "task")
PRESETS = ("fork",)
# What `moe_temperature_freeze` counts: updates of the agent, or the head's own training forwards
# (the fork counted forwards: its dynamics head runs `horizon` of them per update).
FREEZE_UNITS = ("updates", "forwards")


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


def _one_of(key, value, choices):
	if value not in choices:
		_fail(key, f"one of {list(choices)}", value)
	return value


def _as_bounds(key, value):
	try:
		low, high = (check_number(key, v, positive=True) for v in value)
	except (TypeError, ValueError):
		_fail(key, "[low, high] with 0 < low <= high", value)
	if low > high:
		_fail(key, "[low, high] with 0 < low <= high", value)
	return low, high


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
	gate_snapshot_interval: int = 0
	device: object = None
	moe_init_experts: tuple = ()
	moe_freeze_experts: bool = False
	moe_balance: str = "switch"
	moe_shared_head: bool = False
	moe_orthogonal: bool = False
	moe_gate_input: str = "input"
	moe_target_entropy: float = None
	moe_temperature_bounds: tuple = (0.5, 2.0)
	moe_temperature_rate: float = 0.02
	moe_temperature_freeze: int = 0
	moe_temperature_freeze_unit: str = "updates"
	moe_last_norm: bool = False
	moe_gate_offset: bool = False
	moe_expert_dim: int = None
	moe_preset: str = None
	moe_dispatch: str = "auto"
	# Long runs (checkpoint.py): write work_dir/checkpoints/latest.pt every N environment steps (0: never),
	# with the replay buffer or not, and continue from it.
	checkpoint_interval: int = 0
	checkpoint_buffer: bool = False
	resume: bool = False

	@classmethod
	def resolve(cls, cfg=None, **keywords):
		"""
		Returns the settings from `keywords` and TD-MPC2 `cfg` keys of the same names (a cfg value
		other than None wins), on top of the preset `moe_preset` names, on top of the defaults: a key
		set explicitly (keyword or cfg value other than None) wins over the preset. Raises ValueError
		naming the key for an unknown keyword or a bad value.
		"""
		names = [f.name for f in dataclasses.fields(cls)]
		unknown = sorted(set(keywords) - set(names))
		if unknown:
			raise ValueError(f"unknown setting {unknown[0]!r}; settings are {names}")
		explicit = {k: v for k, v in keywords.items() if v is not None}
		if cfg is not None:
			for name in names:
				value = cfg.get(name, None)
				if value is not None:
					explicit[name] = value
		raw = {name: getattr(cls, name) for name in names}
		preset = explicit.get("moe_preset")
		if preset is not None:
			if preset not in PRESETS:
				raise ValueError(f"moe_preset must be null or one of {list(PRESETS)}, got {preset!r}")
			experts = check_int("moe_experts", explicit.get("moe_experts", raw["moe_experts"]), 1, 1024)
			steps = cfg.get("steps", None) if cfg is not None else None
			multitask = bool(cfg.get("multitask", False)) if cfg is not None else False
			raw.update(fork_preset(experts, steps, multitask))
		raw.update(explicit)
		settings = cls._validated(raw)
		if settings.moe_preset is not None and not settings.use_moe:
			raise ValueError(f"moe_preset={settings.moe_preset} builds MoE heads, but use_moe is false: set use_moe=true")
		if settings.moe_gate_input == "task" and settings.use_moe and cfg is not None \
				and cfg.get("multitask", None) is False:
			raise ValueError("moe_gate_input=task needs a multitask agent (task=mt30 or mt80): the gate reads the "
							 "task embedding, and a single-task agent has none; use moe_gate_input=input")
		return settings

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
			gate_snapshot_interval=check_int("gate_snapshot_interval", raw["gate_snapshot_interval"], 0),
			device=resolve_device(raw["device"]),
			moe_init_experts=paths,
			moe_freeze_experts=_as_bool("moe_freeze_experts", raw["moe_freeze_experts"]),
			moe_balance=_one_of("moe_balance", raw["moe_balance"], BALANCES),
			moe_shared_head=_as_bool("moe_shared_head", raw["moe_shared_head"]),
			moe_orthogonal=_as_bool("moe_orthogonal", raw["moe_orthogonal"]),
			moe_gate_input=_one_of("moe_gate_input", raw["moe_gate_input"], GATE_INPUTS),
			moe_target_entropy=None if raw["moe_target_entropy"] is None else
			check_number("moe_target_entropy", raw["moe_target_entropy"], positive=False),
			moe_temperature_bounds=_as_bounds("moe_temperature_bounds", raw["moe_temperature_bounds"]),
			moe_temperature_rate=check_number("moe_temperature_rate", raw["moe_temperature_rate"], positive=True),
			moe_temperature_freeze=check_int("moe_temperature_freeze", raw["moe_temperature_freeze"], 0),
			moe_temperature_freeze_unit=_one_of("moe_temperature_freeze_unit", raw["moe_temperature_freeze_unit"],
												FREEZE_UNITS),
			moe_last_norm=_as_bool("moe_last_norm", raw["moe_last_norm"]),
			moe_gate_offset=_as_bool("moe_gate_offset", raw["moe_gate_offset"]),
			moe_expert_dim=None if raw["moe_expert_dim"] is None else check_int("moe_expert_dim", raw["moe_expert_dim"], 1),
			moe_preset=None if raw["moe_preset"] is None else _one_of("moe_preset", raw["moe_preset"], PRESETS),
			moe_dispatch=_one_of("moe_dispatch", raw["moe_dispatch"], DISPATCHES),
			checkpoint_interval=check_int("checkpoint_interval", raw["checkpoint_interval"], 0),
			checkpoint_buffer=_as_bool("checkpoint_buffer", raw["checkpoint_buffer"]),
			resume=_as_bool("resume", raw["resume"]),
		)

	def block_kwargs(self):
		"""
		Returns the MoEBlock keyword arguments for these settings (gate_history_rows=0: no history).
		`gate_dims` depends on the head and is added where the head is built (moe_gate_input=task), and
		`temperature_freeze` is converted there to the head's training forwards (moe_temperature_freeze_unit).
		"""
		return dict(n_experts=self.moe_experts, top_k=self.moe_top_k, temperature=self.moe_temperature,
					aux_coef=self.moe_aux_coef, zloss_coef=self.moe_zloss_coef,
					history_rows=self.gate_history_rows or None, balance=self.moe_balance,
					shared_head=self.moe_shared_head, orthogonal=self.moe_orthogonal,
					target_entropy=self.moe_target_entropy, temperature_bounds=self.moe_temperature_bounds,
					temperature_rate=self.moe_temperature_rate, temperature_freeze=self.moe_temperature_freeze,
					dispatch=self.moe_dispatch, last_norm=self.moe_last_norm, gate_offset=self.moe_gate_offset,
					expert_dim=self.moe_expert_dim)

	def checkpoint_dict(self):
		"""Returns the settings a checkpoint records, as plain Python types (loadable with weights_only=True)."""
		return dict(use_moe=self.use_moe, moe_experts=self.moe_experts, moe_top_k=self.moe_top_k,
					moe_heads=list(self.moe_heads), moe_temperature=self.moe_temperature,
					moe_aux_coef=self.moe_aux_coef, moe_zloss_coef=self.moe_zloss_coef,
					moe_balance=self.moe_balance, moe_shared_head=self.moe_shared_head,
					moe_orthogonal=self.moe_orthogonal, moe_gate_input=self.moe_gate_input,
					moe_target_entropy=self.moe_target_entropy,
					moe_temperature_bounds=list(self.moe_temperature_bounds),
					moe_temperature_rate=self.moe_temperature_rate, moe_temperature_freeze=self.moe_temperature_freeze,
					moe_temperature_freeze_unit=self.moe_temperature_freeze_unit, moe_last_norm=self.moe_last_norm,
					moe_gate_offset=self.moe_gate_offset, moe_expert_dim=self.moe_expert_dim, moe_preset=self.moe_preset)


def fork_preset(experts, steps=None, multitask=False):
	"""
	Returns the settings of `moe_preset=fork`, the model of the TD-MPC2 fork users come from
	(SC-Levi/boya_tdmpc2 at e42a5c0): dense (top_k = E) orthogonal experts on dynamics and reward with
	a shared output layer that is a NormedLinear on both heads, the gate on the task embedding for
	multitask agents with its bias added after the temperature division, KL balance (0.03),
	temperature 1.8 adapted to 0.75 ln E in [0.5, 2.0] at rate 0.02, frozen for each head's first
	max(5000, 5% of `steps`) training forwards (the fork's `freeze_steps`, counted per block).
	`steps=None` is upstream's default of the fork's own config, 200,000 in its MoEBlock: 5000.
	"""
	freeze = max(5000, int(0.05 * steps)) if steps else 5000
	return dict(moe_heads=("dynamics", "reward"), moe_top_k=experts, moe_orthogonal=True, moe_shared_head=True,
				moe_gate_input="task" if multitask else "input", moe_balance="kl", moe_aux_coef=0.03,
				moe_temperature=1.8, moe_target_entropy=0.75 * math.log(experts), moe_temperature_bounds=(0.5, 2.0),
				moe_temperature_rate=0.02, moe_temperature_freeze=freeze, moe_temperature_freeze_unit="forwards",
				moe_last_norm=True, moe_gate_offset=True)


def config_defaults():
	"""
	Returns {key: default} of the plugin's TD-MPC2 config keys (lists for sequences, None for null).
	Keys that a preset sets are null in the config: null means "not set", so the preset's value (or,
	without a preset, the plugin's default) applies, and a value the user writes wins over the preset.
	"""
	preset_keys = set(fork_preset(MoESettings.moe_experts))
	out = {}
	for f in dataclasses.fields(MoESettings):
		default = None if f.name in preset_keys else f.default
		out[f.name] = list(default) if isinstance(default, tuple) else default
	return out


def _override_value(value):
	if value is None:
		return "null"
	if isinstance(value, bool):
		return str(value).lower()
	if isinstance(value, (list, tuple)):
		return "[" + ",".join(_override_value(v) for v in value) + "]"
	return str(value)


# What a checkpoint's settings must restore to run its model: the architecture and the gate's forward.
# (Loss coefficients and the temperature's update rule only matter while training.)
_MODEL_KEYS = set(ARCHITECTURE) | {"moe_top_k", "moe_temperature", "moe_target_entropy"}


def checkpoint_overrides(saved):
	"""
	Returns the cfg overrides (["use_moe=true", "moe_experts=4", ...]) that rebuild the model of
	checkpoint settings `saved` (a checkpoint_dict), in its order. An architecture key that a checkpoint
	saved before the key existed lacks gets its default (the model it was saved with), so that a preset
	that sets the key today does not change that model.
	"""
	defaults = MoESettings()
	out = [f"{k}={_override_value(v)}" for k, v in saved.items() if k in _MODEL_KEYS]
	out += [f"{k}={_override_value(getattr(defaults, k))}" for k in ARCHITECTURE if k not in saved]
	return out


def describe(settings):
	"""Returns a one-line description of the architecture in checkpoint settings (a checkpoint_dict, or None for plain)."""
	if not settings or not settings.get("use_moe"):
		return "plain TD-MPC2 (use_moe=false)"
	defaults = MoESettings()
	values = []
	for k in ARCHITECTURE[1:]:
		v = settings.get(k, getattr(defaults, k))
		values.append(f"{k}={list(v) if isinstance(v, (list, tuple)) else str(v).lower() if isinstance(v, bool) else v}")
	return " ".join(["use_moe=true", *values])


def check_checkpoint(state, settings):
	"""Raises ValueError naming both sides when checkpoint `state` was saved with other MoE architecture settings."""
	saved = state.get("moe") if isinstance(state, dict) else None
	mine = settings.checkpoint_dict()
	defaults = MoESettings()
	saved_arch = {k: saved.get(k, getattr(defaults, k)) for k in ARCHITECTURE} if saved else {"use_moe": False}
	if not saved_arch["use_moe"] and not mine["use_moe"]:
		return
	if saved_arch.get("use_moe") != mine["use_moe"] or any(saved_arch[k] != mine[k] for k in ARCHITECTURE[1:]):
		raise ValueError(f"checkpoint was saved with {describe(saved)}, but this agent has {describe(mine)}")
