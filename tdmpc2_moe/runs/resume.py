"""
Training with crash-safe checkpoints and resume (`tdmpc2-moe train checkpoint_interval=N
[checkpoint_buffer=true] [resume=true]`, docs/design.md 12); the files themselves are checkpoint.py.

Checkpoints are written at episode ends: upstream's environments cannot be saved mid-episode, so
`checkpoint_interval=N` writes at the first episode end at least N steps after the previous one, and
at the run's last episode end, so that a finished run's file holds where it ended (`resume=true` with
more `steps` goes on from there; `checkpoint=` and `play` take the file's model).
Upstream's OnlineTrainer.train cannot be re-entered at a later step (its loop state lives in local
variables), so with checkpointing `run_online` drives the trainer instead, making the same
evaluations, logs, buffer writes, updates and RNG draws in the same order (a test runs both and
compares), with a checkpoint point after each episode is stored and an entry point there for resuming.
Without checkpoint_interval or resume, upstream's own loop runs.
"""
import contextlib
import time

import numpy as np
import torch

from ..families.task_sets import explicit_tasks
from .checkpoint import (CheckpointError, agent_state, atomic_save, buffer_state, checkpoint_path, load,
						 remove_stale_temporaries, restore_agent, restore_buffer, rng_state, set_rng_state)


def _run_identity(cfg):
	return {"task": str(cfg.task), "obs": str(cfg.obs), "model_size": cfg.model_size}


def collect(trainer, with_buffer):
	"""Returns everything `restore` needs to continue `trainer` (an upstream OnlineTrainer) from this episode end."""
	return {"run": _run_identity(trainer.cfg), "step": trainer._step, "episode": trainer._ep_idx,
			"elapsed_time": time.time() - trainer._start_time,
			"eval_rows": [[float(v) for v in row] for row in trainer.logger._eval],
			"agent": agent_state(trainer.agent), "buffer": buffer_state(trainer.buffer) if with_buffer else None,
			"rng": rng_state(trainer.env)}


def restore(trainer, state, path):
	"""Puts `trainer` in the state `collect` saw. Raises CheckpointError naming `path` for another task or model size."""
	ours = _run_identity(trainer.cfg)
	if state["run"] != ours:
		raise CheckpointError(f"{path} was saved by a run with {state['run']}, this run has {ours}")
	try:
		restore_agent(trainer.agent, state["agent"])
	except ValueError as exc:  # other MoE settings, named on both sides by check_checkpoint
		raise CheckpointError(f"{path}: {exc}") from None
	if state["buffer"] is not None:
		try:
			restore_buffer(trainer.buffer, state["buffer"])
		except ValueError as exc:
			raise CheckpointError(f"{path}: {exc}") from None
	trainer._step, trainer._ep_idx = state["step"], state["episode"]
	trainer._start_time = time.time() - state["elapsed_time"]
	trainer.logger._eval = [np.array(row) for row in state["eval_rows"]]
	set_rng_state(state["rng"], trainer.env)


def _name_resumed_wandb_run(trainer):
	"""
	A resumed run logs to a new wandb run (upstream's logger starts one per process), named after the
	seed and the step it resumed at, with `resumed_from_step` in its config: steps it logs again (those
	after the checkpoint that a killed run had logged) stay apart from the killed run's.
	"""
	wandb = getattr(trainer.logger, "_wandb", None)
	if wandb is None or wandb.run is None:
		return
	wandb.run.name = f"{trainer.cfg.seed} (resumed at step {trainer._step})"
	wandb.run.config.update({"resumed_from_step": trainer._step}, allow_val_change=True)


class Checkpointer:
	"""Writes a trainer's checkpoint at episode ends, every `interval` steps or more and at the run's end (0: never)."""

	def __init__(self, trainer, interval, with_buffer):
		self.trainer, self.interval, self.with_buffer = trainer, interval, with_buffer
		self.path = checkpoint_path(trainer.cfg.work_dir)
		self.last_step = trainer._step

	def resume(self):
		"""Restores the trainer from the checkpoint; returns False (and says so) when there is none yet."""
		remove_stale_temporaries(self.path)
		try:
			state = load(self.path)
		except FileNotFoundError:
			print(f"resume=true: no checkpoint at {self.path}; starting at step 0", flush=True)
			return False
		restore(self.trainer, state, self.path)
		self.last_step = self.trainer._step
		kept = "with" if state["buffer"] is not None else "without"
		print(f"Resumed from {self.path} at step {self.trainer._step:,}, episode {self.trainer._ep_idx} "
			  f"({kept} replay buffer)", flush=True)
		_name_resumed_wandb_run(self.trainer)
		return True

	def maybe_save(self, final=False):
		"""Writes the checkpoint when `interval` steps have passed since the last one, or at the run's `final` episode ends."""
		step = self.trainer._step
		if not self.interval or step == self.last_step or (step - self.last_step < self.interval and not final):
			return
		start = time.perf_counter()
		size = atomic_save(collect(self.trainer, self.with_buffer), self.path)
		self.last_step = step
		print(f"Checkpoint at step {step:,}: {self.path} ({size / 1e6:.1f} MB, "
			  f"{(time.perf_counter() - start) * 1e3:.0f} ms)", flush=True)


def run_online(trainer, interval, with_buffer=False, resume=False):
	"""
	Trains an upstream OnlineTrainer like its `train()`, writing checkpoints every `interval` steps
	(at episode ends) and, with `resume`, continuing from the run's checkpoint when there is one.
	One difference from upstream, only where upstream cannot go: updates wait for the buffer's first
	episode (upstream needs seed_steps >= one episode, and a buffer not kept in the checkpoint restarts
	empty). The action space is seeded where the patched OnlineTrainer is built (patching.py), for
	this loop and upstream's alike.
	"""
	cfg, env, agent, buffer, logger = trainer.cfg, trainer.env, trainer.agent, trainer.buffer, trainer.logger
	ckpt = Checkpointer(trainer, interval, with_buffer)
	# True while the loop stands at the checkpoint's episode end: evaluated, logged and stored already.
	at_checkpoint = resume and ckpt.resume()
	train_metrics, done, eval_next = {}, True, False
	while trainer._step <= cfg.steps:
		if trainer._step % cfg.eval_freq == 0 and not at_checkpoint:
			eval_next = True
		if done:
			if not at_checkpoint:
				if eval_next:
					eval_metrics = trainer.eval()
					eval_metrics.update(trainer.common_metrics())
					logger.log(eval_metrics, "eval")
					eval_next = False
				if trainer._step > 0:
					if info["terminated"] and not cfg.episodic:
						raise ValueError("the episode terminated, but this task is not episodic: "
										 "train it with episodic=true")
					train_metrics.update(
						episode_reward=torch.tensor([td["reward"] for td in trainer._tds[1:]]).sum(),
						episode_success=info["success"], episode_length=len(trainer._tds),
						episode_terminated=info["terminated"])
					train_metrics.update(trainer.common_metrics())
					logger.log(train_metrics, "train")
					# Upstream assigns buffer.add's episode count; counting here keeps the episode counter
					# going after a resume whose buffer restarted empty (the same number otherwise).
					buffer.add(torch.cat(trainer._tds))
					trainer._ep_idx += 1
				# The last episode end(s) before `steps` checkpoint too, so that the file holds where the run ended.
				ckpt.maybe_save(final=trainer._step + cfg.episode_length > cfg.steps)
			at_checkpoint = False
			obs = env.reset()
			trainer._tds = [trainer.to_td(obs)]

		if trainer._step > cfg.seed_steps:
			action = agent.act(obs, t0=len(trainer._tds) == 1)
		else:
			action = env.rand_act()
		obs, reward, done, info = env.step(action)
		trainer._tds.append(trainer.to_td(obs, action, reward, info["terminated"]))

		if trainer._step >= cfg.seed_steps and buffer.num_eps > 0:
			if trainer._step == cfg.seed_steps:
				num_updates = cfg.seed_steps
				print("Pretraining agent on seed data...")
			else:
				num_updates = 1
			for _ in range(num_updates):
				_train_metrics = agent.update(buffer)
			train_metrics.update(_train_metrics)
		trainer._step += 1
	logger.finish(agent)


def check_supported(cfg, settings):
	"""Raises ValueError when checkpointing or resume is asked for a multitask run (offline mt30/mt80, or an online task set)."""
	if not (settings.checkpoint_interval or settings.resume):
		return
	if cfg.get("task") in ("mt30", "mt80"):
		raise ValueError(f"checkpoint_interval and resume cover single-task online training; task={cfg.task} "
						 "runs upstream's offline multitask trainer, which they do not support")
	if explicit_tasks(cfg) is not None:
		raise ValueError(f"checkpoint_interval and resume cover single-task online training; task={cfg.task} with "
						 "tasks=[...] runs the online multitask trainer, which they do not support yet")


@contextlib.contextmanager
def resumable(train_module, settings):
	"""
	While active, upstream's `OnlineTrainer.train` (as `train_module` imported it) runs `run_online`
	with the settings' checkpoint_interval, checkpoint_buffer and resume; a no-op when all are off.
	"""
	if not (settings.checkpoint_interval or settings.resume):
		yield
		return
	cls = train_module.OnlineTrainer
	original = cls.__dict__["train"]

	def train(self):
		run_online(self, settings.checkpoint_interval, settings.checkpoint_buffer, settings.resume)

	cls.train = train
	try:
		yield
	finally:
		cls.train = original
