"""
The TD-MPC2 heads that can become MoE: which `layers.mlp` call builds which head, where each head
sits in a WorldModel and in its checkpoints, expert initialisation from plain checkpoints and
freezing, and the per-update routing metrics of a model's MoE heads.
"""
import linecache
import re

import torch

from ..block.moe import MoEBlock
from ..settings.record import HEADS

# Attribute path of each head in upstream's WorldModel, which is also its checkpoint key prefix
# (`<prefix>.<layer>.<name>` for a plain head, `<prefix>.router.gate.weight` for a MoE head's gate).
HEAD_PREFIX = {"encoder": "_encoder.state", "dynamics": "_dynamics", "reward": "_reward",
			   "termination": "_termination", "pi": "_pi"}
assert tuple(HEAD_PREFIX) == HEADS


def moe_blocks(model):
	"""Returns {head name: MoEBlock} for the MoE heads of a TD-MPC2 WorldModel, in HEADS order."""
	encoder = model._encoder["state"] if "state" in model._encoder else None
	heads = dict(encoder=encoder, dynamics=model._dynamics, reward=model._reward,
				 termination=model._termination, pi=model._pi)
	return {name: m for name, m in heads.items() if isinstance(m, MoEBlock)}


def built_heads(model):
	"""Returns the names of the heads upstream built with `layers.mlp` in this model."""
	names = ["dynamics", "reward", "pi"]
	if "state" in model._encoder:
		names.append("encoder")
	if model._termination is not None:
		names.append("termination")
	return names


_ASSIGNMENT = re.compile(r"^\s*self\._(\w+)\s*=")


def head_of_caller(frame):
	"""Returns the head name that the `mlp` call in `frame` builds, or None when it is not a MoE-able head."""
	if frame.f_code.co_name == "enc":
		return "encoder"
	match = _ASSIGNMENT.match(linecache.getline(frame.f_code.co_filename, frame.f_lineno))
	return match.group(1) if match and match.group(1) in HEADS else None


def training_forwards_per_update(head, cfg):
	"""
	Returns how many training forwards (grad enabled) `head` runs in one upstream update: the dynamics
	head once per step of the `horizon`-step latent rollout, every other head once. Used to express
	`moe_temperature_freeze`, counted by the block in training forwards, in updates
	(moe_temperature_freeze_unit=updates).
	"""
	return int(cfg.horizon) if head == "dynamics" else 1


def task_columns(head, in_dim, cfg):
	"""
	Returns the (start, stop) input columns of `head` that hold the task embedding of a multitask
	agent: upstream appends it to the latent (or observation), and dynamics and reward then append the
	action, so there it sits before the action's columns; elsewhere it is the last `task_dim` columns.
	"""
	task_dim = int(cfg.task_dim)
	if head in ("dynamics", "reward"):
		start = int(cfg.latent_dim)
		return start, start + task_dim
	return in_dim - task_dim, in_dim


def block_options(settings, head, in_dim, cfg):
	"""
	Returns the `BlockOptions` of MoE head `head` with input width `in_dim` in the model of `cfg`: the
	settings' options, with what depends on the head: the freeze in the head's own training forwards,
	and the task-embedding columns when the gate reads the task.
	"""
	per_head = {}
	if settings.moe_temperature_freeze_unit == "updates":
		per_head["temperature_freeze"] = settings.moe_temperature_freeze * training_forwards_per_update(head, cfg)
	if settings.moe_gate_input == "task":
		per_head["gate_dims"] = task_columns(head, in_dim, cfg)
	return settings.block_options(**per_head)


def load_checkpoint(path):
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
			ckpt = load_checkpoint(path)
			if ckpt.get("moe", {}).get("use_moe"):
				raise ValueError(f"moe_init_experts[{i}] = {path} is a MoE checkpoint; expert init needs plain TD-MPC2 ones")
			state = ckpt.get("model", ckpt)
			for name, block in blocks.items():
				for j, layer in enumerate(block.layers):
					pairs = [("weight", "weight"), ("bias", "bias")]
					if layer.norm:
						pairs += [("ln_weight", "ln.weight"), ("ln_bias", "ln.bias")]
					for attr, suffix in pairs:
						key = f"{HEAD_PREFIX[name]}.{j}.{suffix}"
						target = getattr(layer, attr)[i]
						if key not in state or state[key].shape != target.shape:
							found = tuple(state[key].shape) if key in state else "missing"
							raise ValueError(f"moe_init_experts[{i}] = {path}: {key} is {found}, "
											 f"expert needs {tuple(target.shape)}")
						target.copy_(state[key])


def freeze_experts(model):
	"""Stops gradients to every expert parameter of the MoE heads of `model`; the gates keep training."""
	for block in moe_blocks(model).values():
		for p in block.experts.parameters():
			p.requires_grad_(False)


def recent_routing(block, rows):
	"""
	Returns {entropy: mean routing entropy, max_load: largest share of routing slots, usage: [E] share
	of routing slots per expert} over the latest `rows` gate rows of `block` (device tensors, no host
	sync). Reading a few rows back from the ring costs microseconds; statistics over the whole ring
	would cost a large part of an update. Without a ring (gate_history_rows=0) the block's
	latest-batch statistics are returned.
	"""
	stats = block.stats() if block.history is None else block.history.stats(last=rows)
	return {"entropy": stats["entropy"], "max_load": stats["max_load"], "usage": stats["usage"]}


def moe_metrics(model, rows):
	"""
	Returns the update's routing metrics as device tensors (no host sync), or {} when the model has no
	MoE head. Over all heads: `moe_aux_loss` (the heads' aux losses of their latest forward, summed),
	`moe_entropy` (mean routing entropy), `moe_max_load` (largest expert usage share). Per head:
	`moe_aux_loss/<head>`, `moe_entropy/<head>`, `moe_max_load/<head>`, `moe_temperature/<head>` and
	`moe_usage/<head>/<expert>` (that expert's share of the routing slots). Entropy and usage are over
	each head's latest `rows` gate rows. Upstream's logger sends every entry to wandb with its losses.
	"""
	blocks = moe_blocks(model)
	if not blocks:
		return {}
	recent = {head: recent_routing(block, rows) for head, block in blocks.items()}
	out = {
		"moe_aux_loss": torch.stack([b.last_aux_loss for b in blocks.values()]).sum(),
		"moe_entropy": torch.stack([r["entropy"] for r in recent.values()]).mean(),
		"moe_max_load": torch.stack([r["max_load"] for r in recent.values()]).max(),
	}
	for head, block in blocks.items():
		# Copies: the block's aux loss and temperature are buffers that the next forward (planning
		# included) overwrites before upstream's logger reads the info dict at the episode's end.
		out[f"moe_aux_loss/{head}"] = block.last_aux_loss.clone()
		out[f"moe_entropy/{head}"] = recent[head]["entropy"]
		out[f"moe_max_load/{head}"] = recent[head]["max_load"]
		out[f"moe_temperature/{head}"] = block.router.temperature.clone()
		for expert, share in enumerate(recent[head]["usage"].unbind()):
			out[f"moe_usage/{head}/{expert}"] = share
	return out
