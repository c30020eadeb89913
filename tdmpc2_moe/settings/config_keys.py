"""
The settings record (record.py) seen from outside Python: as TD-MPC2 config keys (their defaults,
the text of patches/moe.yaml, command-line overrides) and as the settings entry of a checkpoint
(the overrides that rebuild its model, a one-line description, the check that an agent can load it).
All of it is derived from the fields of `MoESettings`.
"""
import dataclasses

from .record import ARCHITECTURE, MODEL, SHAPE, MoESettings, fork_preset, plain_value

YAML_HEADER = """\
# tdmpc2_moe: Mixture-of-Experts world-model heads. Flat keys, as in TD-MPC2's config.yaml. Generated from
# tdmpc2_moe/settings/record.py by scripts/update_patches.py; `tdmpc2-moe train` adds these keys itself.
# A key that a preset sets is null here: null means "not set", so moe_preset's value applies, or
# without a preset the default named in the comment; a value you write wins over the preset.
# moe
"""


def _preset_keys():
	return set(fork_preset(MoESettings.moe_experts))


def config_defaults():
	"""
	Returns {key: default} of the plugin's TD-MPC2 config keys (lists for sequences, None for null).
	Keys that a preset sets are null in the config: null means "not set", so the preset's value (or,
	without a preset, the plugin's default) applies, and a value the user writes wins over the preset.
	"""
	preset = _preset_keys()
	return {f.name: None if f.name in preset else plain_value(f.default) for f in dataclasses.fields(MoESettings)}


def yaml_value(value):
	"""Returns `value` written as YAML (null, true/false, [a, b], numbers and names as they are)."""
	if value is None:
		return "null"
	if isinstance(value, bool):
		return str(value).lower()
	if isinstance(value, (list, tuple)):
		return "[" + ", ".join(yaml_value(v) for v in value) + "]"
	return str(value)


def config_yaml():
	"""Returns the text of patches/moe.yaml: every key with its config default and its field's doc (and default, when null)."""
	preset = _preset_keys()
	lines = []
	for f in dataclasses.fields(MoESettings):
		value = None if f.name in preset else f.default
		doc = f.metadata["doc"] + (f"; default {yaml_value(f.default)}" if value is None and f.default is not None else "")
		line = f"{f.name}: {yaml_value(value)}"
		lines.append(line + " " * max(2, 28 - len(line)) + f"# {doc}")
	return YAML_HEADER + "\n".join(lines) + "\n"


def override_value(value):
	"""Returns `value` as a Hydra command-line override value (lists without spaces)."""
	return yaml_value(value).replace(", ", ",")


def checkpoint_overrides(saved):
	"""
	Returns the cfg overrides (["use_moe=true", "moe_experts=4", ...]) that rebuild the model of
	checkpoint settings `saved` (a checkpoint_dict): its architecture and the gate's forward. An
	architecture key that a checkpoint saved before the key existed lacks gets its default (the model
	it was saved with), so that a preset that sets the key today does not change that model.
	"""
	restored = {f.name for f in dataclasses.fields(MoESettings) if f.metadata["kind"] in (SHAPE, MODEL)}
	out = [f"{k}={override_value(v)}" for k, v in saved.items() if k in restored]
	return out + [f"{k}={override_value(getattr(MoESettings, k))}" for k in ARCHITECTURE if k not in saved]


def _architecture(saved):
	# Settings saved before a key existed had its default.
	return {k: plain_value(saved.get(k, getattr(MoESettings, k))) for k in ARCHITECTURE}


def describe(saved):
	"""Returns a one-line description of the architecture in checkpoint settings (a checkpoint_dict, or None for plain)."""
	if not saved or not saved.get("use_moe"):
		return "plain TD-MPC2 (use_moe=false)"
	return " ".join(f"{k}={override_value(v)}" for k, v in _architecture(saved).items())


def check_checkpoint(state, settings):
	"""Raises ValueError naming both sides when checkpoint `state` was saved with other MoE architecture settings."""
	saved = state.get("moe") if isinstance(state, dict) else None
	mine = settings.checkpoint_dict()
	theirs = _architecture(saved) if saved else {"use_moe": False}
	if not theirs["use_moe"] and not mine["use_moe"]:
		return
	if theirs["use_moe"] != mine["use_moe"] or any(theirs[k] != mine[k] for k in ARCHITECTURE[1:]):
		raise ValueError(f"checkpoint was saved with {describe(saved)}, but this agent has {describe(mine)}")
