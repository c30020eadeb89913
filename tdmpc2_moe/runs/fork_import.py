"""
Reading checkpoints of the TD-MPC2 fork users come from (SC-Levi/boya_tdmpc2 at e42a5c0, "MooreTDMPC")
and mapping their parameters onto the world model that `use_moe=true moe_preset=fork` builds
(docs/design.md 5a; `tdmpc2-moe import-fork` is the command, docs/coming_from_the_fork.md the guide).

The fork's layout, as its own `save` writes it (`{"model": WorldModel.state_dict()}`):
- a MoE head `<h>` (`_dynamics`, `_reward`) holds its experts as `<h>.trunk.1.model_layers.<e>.<j>.*`
  (NormedLinear j of expert e: `weight`, `bias`, `ln.weight`, `ln.bias`), its shared output layer as
  `<h>.head.*`, a bias-free gate `<h>.gate.weight` [E, gate_in + 1] whose last column multiplies the
  temperature that its logits are then divided by, and the count of its training forwards
  `<h>.global_step`. `<h>.unit_model.*` (the template its experts were copied from, never run) and
  `<h>._aux_loss` (a logged sum) are not part of the model.
- its MoE heads read `[z, a, task embedding]`; upstream's heads (and so ours) read `[z, emb, a]`.
- its Q ensemble is a list of modules, `_Qs.modules_list.<q>.<j>.*` (and `_Qs.module.*`, the same
  module as list entry 0 registered twice), with the target ensemble `_target_Qs.*` alike; upstream
  keeps stacked tensors `_Qs.params.<j>.*` [num_q, ...], their detached twin `_detach_Qs_params.*`
  and `_target_Qs_params.*`.
- the temperature is a Python float, not saved: the fork's own reload restarts it at 1.8.
Everything else (encoder, policy, task embedding) has upstream's names and shapes.
"""
import re

import torch

from ..settings.checks import first_line

FORK_TEMPERATURE = 1.8
"""The temperature a fork checkpoint resumes with in the fork itself (its `moe_tau_init`)."""
MOE_HEADS = ("_dynamics", "_reward")
_PARAM = {"weight": "weight", "bias": "bias", "ln_weight": "ln.weight", "ln_bias": "ln.bias"}
# Keys of the fork's file that hold nothing the model runs (see the module docstring).
_UNUSED = re.compile(r"^(_dynamics|_reward)\.(unit_model\..*|_aux_loss)$|^(_Qs|_target_Qs)\.module\..*$")
# Upstream's buffers that the fork kept as plain attributes (not in its file): computed from the config.
_KEPT = ("_action_masks", "log_std_min", "log_std_dif")
_ENSEMBLE_TARGET = re.compile(r"^(_Qs\.params|_detach_Qs_params|_target_Qs_params)\.(\d+)\.(.+)$")
_MOE_TARGET = re.compile(r"^(_dynamics|_reward)\.(experts\.layers\.(\d+)\.(\w+)|router\.gate\.weight|router\.gate\.bias|"
						 r"router\.adaptive_temperature\.tau|router\.adaptive_temperature\.forwards)$")


class ForkImportError(ValueError):
	"""A fork checkpoint that cannot be imported; the message is one line naming the file and the key."""


def read(path):
	"""
	Returns the model state dict of the fork checkpoint at `path`: a `{"model": state_dict}` file as
	the fork's `save` writes (other entries, such as "training_state", are ignored) or a bare state
	dict. Raises ForkImportError for a missing or unreadable file, a file that is not a fork
	checkpoint, or a fork checkpoint of a model without MoE heads.
	"""
	try:
		ckpt = torch.load(path, map_location="cpu", weights_only=True)
	except FileNotFoundError:
		raise ForkImportError(f"{path}: no such file") from None
	except Exception as exc:  # noqa: BLE001 (zipfile, pickle and torch errors all mean: not a readable checkpoint)
		reason = first_line(exc, 160, type(exc).__name__)
		raise ForkImportError(f"{path}: not a readable PyTorch checkpoint ({reason})") from None
	state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
	if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
		raise ForkImportError(f"{path}: not a TD-MPC2 fork checkpoint (expected {{'model': state_dict}} "
							  "or a state dict of tensors)")
	if "moe" in ckpt:
		raise ForkImportError(f"{path}: a tdmpc2-moe checkpoint (it has the 'moe' settings entry), not the fork's: "
							  "load it with agent.load or play it directly")
	if "_Qs.modules_list.0.0.weight" not in state:
		raise ForkImportError(f"{path}: not a TD-MPC2 fork checkpoint (no key _Qs.modules_list.0.0.weight: the "
							  "fork's Q ensemble is a module list)")
	if "_dynamics.gate.weight" not in state:
		raise ForkImportError(f"{path}: a fork checkpoint without MoE heads (use_moe=false, no key "
							  "_dynamics.gate.weight): it is plain TD-MPC2; nothing to import as MoE")
	return state


def is_unused(key):
	"""Returns True for a key of the fork's file that holds nothing its model runs (not imported)."""
	return bool(_UNUSED.match(key))


def experts_of(state):
	"""Returns the number of experts of the fork's MoE heads (rows of `_dynamics.gate.weight`)."""
	return state["_dynamics.gate.weight"].shape[0]


class _Source:
	"""The fork's state dict; `take(key)` returns a tensor and marks the key as mapped."""

	def __init__(self, path, state):
		self.path, self.state, self.used = path, state, set()

	def take(self, key, *, for_key):
		if key not in self.state:
			raise ForkImportError(f"{self.path}: missing key {key} (needed for {for_key})")
		self.used.add(key)
		return self.state[key]

	def unmapped(self):
		return sorted(k for k in self.state if k not in self.used and not is_unused(k))


def _to_upstream_columns(weight, latent_dim, action_dim, task_dim):
	"""Reorders the input columns of a first-layer weight from the fork's [z, a, emb] to upstream's [z, emb, a]."""
	z, a, emb = weight.split([latent_dim, action_dim, task_dim], dim=-1)
	return torch.cat([z, emb, a], dim=-1)


def _moe_value(src, key, match, n_hidden, experts, layout, temperatures):
	head, rest = match.group(1), match.group(2)
	if rest == "router.gate.weight":
		return src.take(f"{head}.gate.weight", for_key=key)[:, :-1], f"{head}.gate.weight[:, :-1]"
	if rest == "router.gate.bias":
		return src.take(f"{head}.gate.weight", for_key=key)[:, -1], f"{head}.gate.weight[:, -1] (temperature column)"
	if rest == "router.adaptive_temperature.tau":
		return torch.tensor(float(temperatures[head.lstrip("_")])), "--tau-" + head.lstrip("_")
	if rest == "router.adaptive_temperature.forwards":
		return src.take(f"{head}.global_step", for_key=key).to(torch.int64), f"{head}.global_step"
	layer, param = int(match.group(3)), _PARAM[match.group(4)]
	if layer == n_hidden:  # the shared output layer
		return src.take(f"{head}.head.{param}", for_key=key), f"{head}.head.{param}"
	names = [f"{head}.trunk.1.model_layers.{e}.{layer}.{param}" for e in range(experts)]
	value = torch.stack([src.take(n, for_key=key) for n in names])
	origin = f"{head}.trunk.1.model_layers.{{0..{experts - 1}}}.{layer}.{param}"
	if layer == 0 and param == "weight" and layout["task_dim"]:
		value = _to_upstream_columns(value, layout["latent_dim"], layout["action_dim"], layout["task_dim"])
		origin += " (columns [z, a, emb] -> [z, emb, a])"
	return value, origin


def _ensemble_value(src, key, match, num_q):
	prefix, layer, param = match.groups()
	fork = "_target_Qs" if prefix == "_target_Qs_params" else "_Qs"
	names = [f"{fork}.modules_list.{q}.{layer}.{param}" for q in range(num_q)]
	return torch.stack([src.take(n, for_key=key) for n in names]), f"{fork}.modules_list.{{0..{num_q - 1}}}.{layer}.{param}"


def map_state(path, state, target, *, layout, temperatures):
	"""
	Returns `(mapped, lines)`: a state dict with every key of `target` (the state dict of the
	world model `moe_preset=fork` built) filled from the fork's `state`, and one line per key saying
	where its value came from. `layout` holds latent_dim, action_dim, task_dim (0 single-task) and
	num_q; `temperatures` {"dynamics": tau, "reward": tau}. Values the fork's file does not hold
	(upstream's buffers: action masks, log-std bounds, the ensembles' batch size and device entries)
	keep the target's. Raises ForkImportError naming the file and the key for a missing key, a key
	left over, or a shape that differs from the target's (both shapes named).
	"""
	src = _Source(path, state)
	# The index of each MoE head's last (shared) layer is its number of hidden layers.
	n_hidden = {head: max(int(k.split(".")[3]) for k in target if k.startswith(f"{head}.experts.layers."))
				for head in MOE_HEADS if f"{head}.router.gate.weight" in target}
	experts = experts_of(state)
	mapped, lines = {}, []
	for key, want in target.items():
		moe, ensemble = _MOE_TARGET.match(key), _ENSEMBLE_TARGET.match(key)
		if key in _KEPT or key.rsplit(".", 1)[-1].startswith("__"):  # upstream's buffers, tensordict metadata
			mapped[key] = want
			continue
		if moe and moe.group(1) in n_hidden:
			value, origin = _moe_value(src, key, moe, n_hidden[moe.group(1)], experts, layout, temperatures)
		elif ensemble:
			value, origin = _ensemble_value(src, key, ensemble, layout["num_q"])
		else:
			value, origin = src.take(key, for_key=key), key
		if tuple(value.shape) != tuple(want.shape):
			raise ForkImportError(f"{path}: {origin} has shape {tuple(value.shape)}, but {key} of the model these "
								  f"keys build has {tuple(want.shape)}: do task, model_size and the moe_* keys "
								  "match the fork run?")
		mapped[key] = value.to(want.dtype).clone()
		lines.append(f"{key} {list(want.shape)} <- {origin}")
	left = src.unmapped()
	if left:
		raise ForkImportError(f"{path}: key {left[0]} (and {len(left) - 1} more) has no place in the model these keys "
							  "build: do task and the moe_* keys match the fork run?")
	return mapped, lines
