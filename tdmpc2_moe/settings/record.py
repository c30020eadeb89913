"""
The plugin's settings record (docs/design.md 13): every setting exactly once, as a field of the frozen
dataclass `MoESettings` with its name (the TD-MPC2 config key and `patch()` keyword), type, default,
check and one line of documentation. Everything else derives from the fields:
- validation (`MoESettings.__post_init__` runs each field's check, then the checks across fields);
- `MoESettings.resolve(cfg, **keywords)`: keywords, cfg keys and the preset;
- MoEBlock's options: a field with a `block` name is the MoEBlock keyword of that name, and
  `BlockOptions` (the record MoEBlock, its router and its experts read) is generated from those fields;
- the config keys (`config_defaults`) and `patches/moe.yaml` (`config_yaml`, written by
  scripts/update_patches.py);
- what a checkpoint records and must match (a field's `kind`): `checkpoint_dict`, `ARCHITECTURE`,
  `checkpoint_overrides`, `check_checkpoint`.
Adding an option: its field here, its use, its test and its line in the README.

This is the bottom of the package's Python layers: it imports nothing of the package but checks.py.
"""
import dataclasses
import math

import torch

from .checks import DISPATCHES, boolean, bounds, gpu_ids, integer, is_pair, names, number, one_of, optional

# The world-model heads that upstream builds with `layers.mlp` and that can become MoE.
HEADS = ("encoder", "dynamics", "reward", "termination", "pi")
BALANCES = ("switch", "kl")
GATE_INPUTS = ("input", "task")
PRESETS = ("fork",)
# What `moe_temperature_freeze` counts: updates of the agent, or the head's own training forwards
# (the fork counted forwards: its dynamics head runs `horizon` of them per update).
FREEZE_UNITS = ("updates", "forwards")

# What a checkpoint does with a setting, the field's `kind`:
SHAPE = "architecture"  # decides the parameters' shapes or meaning: recorded, and a checkpoint must match
MODEL = "model"  # the gate's forward: recorded, and restored when a checkpoint's model is rebuilt
TRAINING = "training"  # recorded for the reader, not restored (loss weights, the temperature's rule)
RUN = "run"  # this process only (diagnostics, devices, files): not recorded


def setting(default, doc, check, *, kind=RUN, block=None):
	"""
	Returns the dataclass field of one setting: its `default`, `doc` (its line in patches/moe.yaml),
	`check(name, value) -> value` (raises ValueError naming it), what a checkpoint does with it
	(`kind`) and, for a MoEBlock option, the block's keyword for it (`block`).
	"""
	return dataclasses.field(default=default, metadata={"doc": doc, "check": check, "kind": kind, "block": block})


def resolve_device(name, device):
	"""Returns `device` as a torch.device, or None for None (upstream's own 'cuda:0'). Raises ValueError naming it."""
	if device is None or isinstance(device, torch.device):
		return device
	try:
		return torch.device(device)
	except (RuntimeError, TypeError) as exc:
		raise ValueError(f"{name} must be None or a torch device string like 'cpu' or 'cuda:0', got {device!r}") from exc


@dataclasses.dataclass(frozen=True)
class MoESettings:
	"""
	The plugin's settings, validated; build with `MoESettings.resolve(cfg, **keywords)`. Heads in
	`moe_heads` that the model does not build with `layers.mlp` (termination when not episodic, the
	encoder of pixel observations) stay upstream's. Each field's doc is its line in patches/moe.yaml.
	"""
	use_moe: bool = setting(False, "build the heads in moe_heads as MoEBlocks (false: upstream TD-MPC2)",
							boolean, kind=SHAPE)
	moe_preset: str = setting(None, 'null, or fork: the fork\'s MOORE-style model (see the README, "Coming from the fork")',
							  optional(one_of(*PRESETS)), kind=TRAINING)
	moe_experts: int = setting(4, "experts per MoE head (1..1024)", integer(1, 1024), kind=SHAPE, block="n_experts")
	moe_top_k: int = setting(2, "experts mixed per input (1..moe_experts; moe_experts is the dense gate)",
							 integer(1, 1024), kind=MODEL, block="top_k")
	moe_heads: tuple = setting(("dynamics", "reward", "pi"), f"which heads: any of {', '.join(HEADS)}",
							   names(HEADS, unique=True), kind=SHAPE)
	moe_temperature: float = setting(1.0, "gate softmax temperature (> 0); the start when adapted",
									 number(positive=True), kind=MODEL, block="temperature")
	moe_aux_coef: float = setting(0.01, "load-balancing loss weight (>= 0)", number(positive=False), kind=TRAINING,
								  block="aux_coef")
	moe_zloss_coef: float = setting(0.0, "router z-loss weight (>= 0)", number(positive=False), kind=TRAINING,
									block="zloss_coef")
	moe_balance: str = setting("switch", "load-balancing term: switch, or kl (KL(uniform || mean gate probability))",
							   one_of(*BALANCES), kind=SHAPE, block="balance")
	moe_shared_head: bool = setting(False, "true: experts are the hidden layers, one shared last layer after the mix",
									boolean, kind=SHAPE, block="shared_head")
	moe_orthogonal: bool = setting(False, "true: Gram-Schmidt the experts' mixed features per input, as MOORE",
								   boolean, kind=SHAPE, block="orthogonal")
	moe_gate_input: str = setting("input", "input (the gate reads the head's input) or task (the task embedding; "
								  "multitask only)", one_of(*GATE_INPUTS), kind=SHAPE)
	moe_target_entropy: float = setting(None, "null: fixed temperature; H* in nats: adapt the temperature toward "
										"it after each update", optional(number(positive=False)), kind=MODEL,
										block="target_entropy")
	moe_temperature_bounds: tuple = setting((0.5, 2.0), "[low, high] the adapted temperature stays in", bounds,
											kind=TRAINING, block="temperature_bounds")
	moe_temperature_rate: float = setting(0.02, "step of the adaptation, tau += rate * tanh(H* - H) (> 0)",
										  number(positive=True), kind=TRAINING, block="temperature_rate")
	moe_temperature_freeze: int = setting(0, "updates (or forwards, below) before the temperature starts to adapt",
										  integer(0), kind=TRAINING, block="temperature_freeze")
	moe_temperature_freeze_unit: str = setting(
		"updates", "what the freeze counts: updates, or forwards (each head's own training forwards; dynamics runs "
		"horizon per update, as the fork counted)", one_of(*FREEZE_UNITS), kind=TRAINING)
	moe_last_norm: bool = setting(False, "true: the last layer is a NormedLinear (LayerNorm + Mish) on heads whose "
								  "upstream last layer is a plain Linear (reward, pi), as the fork's reward head",
								  boolean, kind=SHAPE, block="last_norm")
	moe_gate_offset: bool = setting(False, "true: gate logits W x / tau + b, the bias not divided by the temperature "
									"(the fork's temperature column); false: (W x + b) / tau", boolean, kind=SHAPE,
									block="gate_offset")
	moe_expert_dim: int = setting(None, "hidden width of every expert layer (null: the head's mlp_dim); e.g. mlp_dim/2 "
								  "with moe_experts=8 moe_top_k=2 costs what plain costs (README, \"Settings\")",
								  optional(integer(1)), kind=SHAPE, block="expert_dim")
	gate_history_rows: int = setting(65536, "rows of gate weights kept per head, on the device (0: none)",
									 optional(integer(0)), block="history_rows")
	monitor_mem_interval: int = setting(1000, "updates between memory reports (0: no monitor)", integer(0))
	gate_snapshot_interval: int = setting(0, "updates between gate snapshots to work_dir/gates/step_<update>.npz + "
										  ".png (0: none)", integer(0))
	device: object = setting(None, "null: upstream's cuda:0; cpu trains without CUDA", resolve_device)
	env_module: tuple = setting(None, "modules to import before a gym:<id> task is made (the ones that register its "
								"environment), e.g. [my_lab.envs]", optional(names()))
	moe_init_experts: tuple = setting((), "plain TD-MPC2 checkpoints, one per expert, to initialise experts from",
									  names())
	moe_freeze_experts: bool = setting(False, "train only the gates (experts frozen)", boolean)
	moe_dispatch: str = setting("auto", "how MoE heads run their experts: auto (by device and shape), dense (all on "
								"every input) or sparse (only each input's top-k)", one_of(*DISPATCHES),
								block="dispatch")
	checkpoint_interval: int = setting(0, "environment steps between crash-safe checkpoints to "
									   "work_dir/checkpoints/latest.pt (0: none)", integer(0))
	checkpoint_buffer: bool = setting(False, "also checkpoint the replay buffer (exact resume; larger file, see "
									  "README \"Long runs\")", boolean)
	resume: bool = setting(False, "continue from work_dir/checkpoints/latest.pt (starts at step 0 when there is none)",
						   boolean)
	deterministic: bool = setting(False, "deterministic torch: use_deterministic_algorithms, CUBLAS_WORKSPACE_CONFIG, "
								  "cuDNN flags (for CUDA runs; seeded CPU runs repeat without it; docs/long_runs.md)", boolean)
	sweep_threads: int = setting(1, "torch threads of each job of a sweep (OMP_NUM_THREADS, MKL_NUM_THREADS of its "
								 "process; 0: as the environment sets them)", integer(0))
	sweep_gpus: tuple = setting(None, "GPUs the jobs of a sweep on this node get, one each, round-robin (null: every GPU "
								"the node has; Ray and SLURM assign their own)", optional(gpu_ids))

	def __post_init__(self):
		_check_fields(self)
		check_block_options(self._block_values(), lambda option: BLOCK_KEYS[option])
		if self.moe_init_experts and len(self.moe_init_experts) != self.moe_experts:
			raise ValueError(f"moe_init_experts must name one checkpoint per expert (moe_experts={self.moe_experts}), "
							 f"got {len(self.moe_init_experts)}")
		if self.moe_preset is not None and not self.use_moe:
			raise ValueError(f"moe_preset={self.moe_preset} builds MoE heads, but use_moe is false: set use_moe=true")

	@classmethod
	def resolve(cls, cfg=None, **keywords):
		"""
		Returns the settings from `keywords` and TD-MPC2 `cfg` keys of the same names (a cfg value
		other than None wins), on top of the preset `moe_preset` names, on top of the defaults: a key
		set explicitly (keyword or cfg value other than None) wins over the preset. Raises ValueError
		naming the key for an unknown keyword or a bad value.
		"""
		keys = [f.name for f in dataclasses.fields(cls)]
		unknown = sorted(set(keywords) - set(keys))
		if unknown:
			raise ValueError(f"unknown setting {unknown[0]!r}; settings are {keys}")
		explicit = {k: v for k, v in keywords.items() if v is not None}
		if cfg is not None:
			explicit.update({k: cfg.get(k, None) for k in keys if cfg.get(k, None) is not None})
		values = {}
		if explicit.get("moe_preset") is not None:
			one_of(*PRESETS)("moe_preset", explicit["moe_preset"])
			experts = integer(1, 1024)("moe_experts", explicit.get("moe_experts", cls.moe_experts))
			values.update(fork_preset(experts, cfg.get("steps", None) if cfg is not None else None,
									  bool(cfg.get("multitask", False)) if cfg is not None else False))
		settings = cls(**{**values, **explicit})
		if settings.moe_gate_input == "task" and settings.use_moe and cfg is not None \
				and cfg.get("multitask", None) is False:
			raise ValueError("moe_gate_input=task needs a multitask agent (task=mt30, mt80, or task=<name> tasks=[...]): "
							 "the gate reads the task embedding, and a single-task agent has none; use moe_gate_input=input")
		return settings

	def _block_values(self):
		return {f.metadata["block"]: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata["block"]}

	def block_options(self, **per_head):
		"""
		Returns the `BlockOptions` of these settings; `per_head` adds what depends on the head (its
		`gate_dims`, its `temperature_freeze` in training forwards: heads.block_options).
		"""
		return BlockOptions(**{**self._block_values(), **per_head})

	def checkpoint_dict(self):
		"""Returns the settings a checkpoint records (every kind but "run"), as plain Python types (weights_only loads them)."""
		return {f.name: plain_value(getattr(self, f.name)) for f in dataclasses.fields(self) if f.metadata["kind"] != RUN}


def _check_fields(record):
	# Each field through its own check, under its own name; the normalised value replaces the given one.
	for field in dataclasses.fields(record):
		object.__setattr__(record, field.name, field.metadata["check"](field.name, getattr(record, field.name)))


def plain_value(value):
	"""Returns a setting's value as a plain Python type for files and configs (tuples as lists)."""
	return list(value) if isinstance(value, tuple) else value


def check_block_options(values, name):
	"""
	Checks MoEBlock options against each other (each on its own is checked by its field): `values` maps
	option names to values, `name(option)` gives the name an error shows (the keyword, or the config
	key). Shapes (in_dim, widths) are checked where the router and the experts are built.
	"""
	n, k = values["n_experts"], values["top_k"]
	if k > n:
		raise ValueError(f"{name('top_k')} must be an int in 1..{name('n_experts')}={n}, got {k}")
	if values["dispatch"] == "sparse" and values["orthogonal"]:
		raise ValueError(f"{name('dispatch')}='sparse' cannot run with {name('orthogonal')}=True: each row's E expert "
						 "features are orthonormalised together, so every expert runs on every row; use 'dense' or 'auto'")
	target, (low, high), start = values["target_entropy"], values["temperature_bounds"], values["temperature"]
	if target is not None:
		if target > math.log(k) + 1e-9:
			raise ValueError(f"{name('target_entropy')}={target} nats is out of reach: the routing weights of "
							 f"{name('top_k')}={k} experts have an entropy of at most ln({k})={math.log(k):.4f}")
		if not low <= start <= high:
			raise ValueError(f"{name('temperature')}={start} (the adaptive temperature's start) must lie within "
							 f"{name('temperature_bounds')}=({low}, {high})")


def _gate_dims(name, value):
	if not is_pair(value) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value) \
			or not 0 <= value[0] < value[1]:
		raise ValueError(f"{name} must be None or (start, stop) with 0 <= start < stop <= in_dim, got {value!r}")
	return tuple(value)


def _block_option_fields():
	fields = [(f.metadata["block"], f.type, dataclasses.field(default=f.default, metadata=f.metadata))
			  for f in dataclasses.fields(MoESettings) if f.metadata["block"]]
	# The only option that no setting holds: heads.block_options derives it from moe_gate_input.
	fields.append(("gate_dims", tuple, setting(None, "(start, stop): the gate reads only these input columns",
											   optional(_gate_dims))))
	return fields


def _check_block_fields(self):
	_check_fields(self)
	check_block_options(dataclasses.asdict(self), str)


BlockOptions = dataclasses.make_dataclass(
	"BlockOptions", _block_option_fields(), frozen=True, namespace={
		"__post_init__": _check_block_fields, "__module__": __name__,
		"__doc__": "MoEBlock's options, under its keyword names, validated: the `block` fields of MoESettings "
				   "(same defaults, checks and docs) plus `gate_dims`. `history_rows` None or 0 keeps no history; "
				   "`temperature_freeze` counts the block's own training forwards."})
# Config key of each MoEBlock option (for the errors MoESettings raises about them).
# The settings of the MoE heads alone (moe_*, gate_*): a run with use_moe=false is the same whatever they hold.
MOE_ONLY = tuple(f.name for f in dataclasses.fields(MoESettings) if f.name.startswith(("moe_", "gate_")))
BLOCK_KEYS = {f.metadata["block"]: f.name for f in dataclasses.fields(MoESettings) if f.metadata["block"]}
# Settings a checkpoint must match (use_moe first).
ARCHITECTURE = tuple(f.name for f in dataclasses.fields(MoESettings) if f.metadata["kind"] == SHAPE)


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
