"""
Crash-safe checkpoints of an upstream TD-MPC2 online training run, and resuming from them
(docs/design.md 12; `tdmpc2-moe train checkpoint_interval=N [checkpoint_buffer=true] [resume=true]`).

A checkpoint is `work_dir/checkpoints/latest.pt`, written atomically (`atomic_save`: temporary file,
fsync, rename, fsync of the directory), so a process killed at any moment leaves either the previous
complete checkpoint or the new one, never a partial file. It holds plain types and tensors only, is
read with `torch.load(weights_only=True)` and carries a CRC-32 of its contents (`load` turns a
truncated or corrupted file into a one-line CheckpointError naming it). It holds:
- the agent: world model (MoE experts, gates and gate temperatures included), both Adam optimisers,
  the running Q scale, the planner's warm-start mean, the MoE settings (checked on resume);
- the run: step and episode counters, elapsed time, the evaluation rows upstream's logger rewrites
  into eval.csv, and the RNG states of torch (CPU and CUDA), numpy, python and the environment
  (the action space's generator, which draws the seed-phase random actions, and the dm_control
  task's generator, which draws each episode's initial state);
- with `checkpoint_buffer=true`, the filled part of the replay buffer and its write cursor.
Not in it: gate history rings and the memory monitor (diagnostics, restarted empty), torch.compile
caches (recompiled), the wandb run (a resumed run starts a new one, named after the step it resumed at).

When and how a training run writes and resumes from these files is resume.py.
"""
import os
import random
import zlib
from pathlib import Path

import numpy as np
import torch

from ..settings.config_keys import check_checkpoint
from ..settings.checks import first_line

FORMAT = 1
FILENAME = "latest.pt"


class CheckpointError(Exception):
	"""A checkpoint file that cannot be used; the message is one line naming the file."""


def checkpoint_path(work_dir):
	"""Returns the path of the run's checkpoint, `work_dir/checkpoints/latest.pt`."""
	return Path(work_dir) / "checkpoints" / FILENAME


def _temporary(path):
	return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def remove_stale_temporaries(path):
	"""Deletes temporary files that killed writers of `path` left behind; returns how many."""
	path = Path(path)
	stale = list(path.parent.glob(f".{path.name}.tmp-*")) if path.parent.is_dir() else []
	for p in stale:
		p.unlink(missing_ok=True)
	return len(stale)


def checksum(obj, crc=0):
	"""
	Returns the CRC-32 of a nest of dicts, lists and tuples of tensors and plain values (keys, dtypes,
	shapes and bytes of every tensor, repr of every other value). torch.load does not check the CRCs
	of its zip entries, so a flipped byte in tensor data would otherwise load silently.
	"""
	if torch.is_tensor(obj):
		t = obj.detach().cpu().contiguous().reshape(-1)
		crc = zlib.crc32(f"{t.dtype}{tuple(obj.shape)}".encode(), crc)
		return zlib.crc32(t.view(torch.uint8).numpy(), crc)
	if isinstance(obj, dict):
		for key, value in obj.items():
			crc = checksum(value, zlib.crc32(repr(key).encode(), crc))
		return crc
	if isinstance(obj, (list, tuple)):
		for value in obj:
			crc = checksum(value, crc)
		return zlib.crc32(f"{type(obj).__name__}{len(obj)}".encode(), crc)
	return zlib.crc32(repr(obj).encode(), crc)


def atomic_save(state, path):
	"""
	Writes `state` (a dict of tensors and plain values) to `path` with its checksum, so that `path`
	is never a partial file: the data goes to a temporary file in the same directory, is fsynced,
	renamed over `path` (atomic on POSIX), and the directory is fsynced so that the rename survives a
	power cut. Returns the size in bytes.
	"""
	path = Path(path)
	path.parent.mkdir(parents=True, exist_ok=True)
	tmp = _temporary(path)
	try:
		with open(tmp, "wb") as f:
			torch.save({"format": FORMAT, "crc32": checksum(state), "state": state}, f)
			f.flush()
			os.fsync(f.fileno())
		size = tmp.stat().st_size
		os.replace(tmp, path)
	except BaseException:
		tmp.unlink(missing_ok=True)
		raise
	fd = os.open(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
	try:
		os.fsync(fd)
	finally:
		os.close(fd)
	return size


def load(path):
	"""
	Returns the state `atomic_save` wrote to `path` (tensors on the CPU), read with weights_only=True
	and checked against its checksum. Raises FileNotFoundError when there is none and
	CheckpointError, with a one-line message naming the file, when it is truncated, corrupted, holds
	other than plain types, or was not written by `atomic_save`.
	"""
	path = Path(path)
	if not path.is_file():
		raise FileNotFoundError(f"no checkpoint at {path}")
	try:
		saved = torch.load(path, map_location="cpu", weights_only=True)
	except Exception as exc:  # noqa: BLE001 (a damaged file fails in zipfile, pickle or torch: all mean the same)
		reason = first_line(exc, 160)
		raise CheckpointError(f"{_damaged(path)} ({type(exc).__name__}: {reason}); delete it to start over") from None
	if not _is_training_checkpoint(saved):
		raise CheckpointError(f"{path} is not a tdmpc2-moe training checkpoint (format {FORMAT})")
	return _checked_state(saved, path)


def _damaged(path):
	return f"{path} is truncated or corrupted and cannot be resumed from"


def _is_training_checkpoint(saved):
	"""Whether `saved` (what torch.load returned) is a file `atomic_save` wrote."""
	return isinstance(saved, dict) and saved.get("format") == FORMAT and "state" in saved


def _checked_state(saved, path):
	"""Returns the state of `saved`, a training checkpoint read from `path`, after checking its checksum."""
	if checksum(saved["state"]) != saved.get("crc32"):
		raise CheckpointError(f"{_damaged(path)} (checksum mismatch); delete it to start over")
	return saved["state"]


# RNG states -----------------------------------------------------------------------------------------

def _env_generators(env):
	"""
	Returns {name: numpy generator} of the RNGs an upstream environment draws from, found along its
	wrapper chain (`.env`): a gymnasium env's own `_np_random`, the generators of the action and
	observation spaces on the wrapper that defines them, and a dm_control environment's `task.random`.
	"""
	out, seen, depth = {}, set(), 0
	while env is not None and id(env) not in seen:
		seen.add(id(env))
		own = getattr(env, "__dict__", {})
		found = {"np_random": own.get("_np_random"), "task.random": getattr(getattr(env, "task", None), "random", None)}
		for space in ("action_space", "observation_space"):
			found[f"{space}.np_random"] = getattr(own.get(space), "np_random", None)
		for name, gen in found.items():
			if isinstance(gen, (np.random.Generator, np.random.RandomState)):
				out[f"{depth}.{name}"] = gen
		env, depth = getattr(env, "env", None), depth + 1
	return out


def _generator_state(gen):
	if isinstance(gen, np.random.Generator):
		return {"generator": gen.bit_generator.state}
	kind, keys, pos, has_gauss, gauss = gen.get_state()
	return {"random_state": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]}


def _set_generator_state(gen, state):
	if "generator" in state:
		gen.bit_generator.state = state["generator"]
	else:
		kind, keys, pos, has_gauss, gauss = state["random_state"]
		gen.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


def rng_state(env=None):
	"""Returns the RNG states of torch (CPU, and CUDA when initialised), numpy, python and `env` as plain types."""
	kind, keys, pos, has_gauss, gauss = np.random.get_state()
	version, internal, gauss_next = random.getstate()
	state = {"torch": torch.get_rng_state(),
			 "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
			 "python": [version, list(internal), gauss_next],
			 "env": {name: _generator_state(g) for name, g in _env_generators(env).items()} if env is not None else {}}
	if torch.cuda.is_available() and torch.cuda.is_initialized():
		state["cuda"] = torch.cuda.get_rng_state_all()
	return state


def set_rng_state(state, env=None):
	"""Restores what `rng_state` returned (the environment's generators when `env` has the same ones)."""
	torch.set_rng_state(state["torch"])
	if "cuda" in state and torch.cuda.is_available():
		torch.cuda.set_rng_state_all(state["cuda"])
	kind, keys, pos, has_gauss, gauss = state["numpy"]
	np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
	version, internal, gauss_next = state["python"]
	random.setstate((version, tuple(internal), gauss_next))
	if env is not None:
		for name, gen in _env_generators(env).items():
			if name in state["env"]:
				_set_generator_state(gen, state["env"][name])


# Agent, replay buffer, trainer -----------------------------------------------------------------------

def agent_state(agent):
	"""Returns the training state of an upstream TDMPC2 agent: model, both optimisers, Q scale, planner mean, MoE settings."""
	settings = getattr(agent.model, "moe_settings", None)
	return {"model": agent.model.state_dict(), "optim": agent.optim.state_dict(), "pi_optim": agent.pi_optim.state_dict(),
			"scale": dict(agent.scale.state_dict()), "prev_mean": agent._prev_mean.detach().clone(),
			"moe": settings.checkpoint_dict() if settings is not None else None}


# How an optimiser runs, not what it has learnt: these belong to the machine that resumes.
_OPTIMIZER_IMPLEMENTATION = ("fused", "foreach", "capturable")


def load_optimizer(optimizer, state):
	"""
	`optimizer.load_state_dict(state)`, keeping `optimizer`'s own implementation flags (fused, foreach,
	capturable): torch takes the saved param groups whole, so a checkpoint written on CUDA (capturable)
	would otherwise bring its flags to the CPU, and one written with the loop Adam would turn the fused
	one back into the loop (upstream/device.py `cpu_adam_fused`). Moments and step counts load as saved.
	"""
	flags = [{key: group[key] for key in _OPTIMIZER_IMPLEMENTATION if key in group} for group in optimizer.param_groups]
	optimizer.load_state_dict(state)
	for group, own in zip(optimizer.param_groups, flags):
		group.update(own)


def restore_agent(agent, state):
	"""Loads `agent_state` output into `agent`; raises ValueError naming both sides for other MoE settings."""
	if getattr(agent.model, "moe_settings", None) is not None:
		check_checkpoint(state, agent.model.moe_settings)
	agent.model.load_state_dict(state["model"])
	load_optimizer(agent.optim, state["optim"])
	load_optimizer(agent.pi_optim, state["pi_optim"])
	agent.scale.load_state_dict(state["scale"])
	agent._prev_mean.copy_(state["prev_mean"])


def buffer_state(buffer):
	"""
	Returns the contents of an upstream Buffer: the filled rows of its storage (nested dict of CPU
	tensors, in storage order), the writer's cursor and write count, and the episode count.
	"""
	rb = getattr(buffer, "_buffer", None)
	if rb is None:
		return {"num_eps": buffer.num_eps, "rows": None}
	n = len(rb._storage)
	# clone(): torch.save writes a view's whole storage, which is the buffer's full capacity.
	return {"num_eps": buffer.num_eps, "rows": rb._storage._storage[:n].cpu().clone().to_dict(),
			"cursor": int(rb._writer._cursor), "write_count": int(rb._writer._write_count), "capacity": buffer.capacity}


def restore_buffer(buffer, state):
	"""
	Refills an empty upstream Buffer from `buffer_state` output: same rows at the same storage
	positions. A run resumed with more `steps` has a larger buffer (capacity min(buffer_size, steps)):
	that works while the saved buffer had not wrapped around; ValueError otherwise.
	"""
	from tensordict import TensorDict
	if state["rows"] is not None:
		n = len(state["rows"]["episode"])
		cursor = state["cursor"]
		if buffer.capacity != state["capacity"]:
			if state["write_count"] > n or n > buffer.capacity:
				raise ValueError(f"the saved replay buffer (capacity {state['capacity']:,}, {state['write_count']:,} "
								 f"rows written) does not fit this run's capacity {buffer.capacity:,} "
								 "(min(buffer_size, steps)): resume with the same steps and buffer_size")
			cursor = n % buffer.capacity
		rows = TensorDict(state["rows"], batch_size=[n])
		buffer._buffer = buffer._init(rows)
		buffer._buffer.extend(rows)
		buffer._buffer._writer._cursor = cursor
		buffer._buffer._writer._write_count = state["write_count"]
	buffer._num_eps = state["num_eps"]


def model_file(path):
	"""
	Returns {"model": state dict, "moe": settings or None} of the model in `path`, which is either what
	a patched agent's `save` writes (upstream's models/*.pt) or a training checkpoint (latest.pt: its
	agent's model, checked against its checksum). What `checkpoint=PATH` and `tdmpc2-moe play` load.
	Raises FileNotFoundError or CheckpointError naming the file.
	"""
	path = Path(path)
	if not path.is_file():
		raise FileNotFoundError(f"no checkpoint at {path}")
	try:
		saved = torch.load(path, map_location="cpu", weights_only=True)
	except Exception as exc:  # noqa: BLE001 (zipfile, pickle and torch errors all mean an unreadable file)
		raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): "
							  f"{first_line(exc, 160)}") from None
	if _is_training_checkpoint(saved):
		# The file is read once: its agent state is checked against the checksum here, not loaded again.
		agent = _checked_state(saved, path)["agent"]
		return {"model": agent["model"], "moe": agent["moe"]}
	return saved
