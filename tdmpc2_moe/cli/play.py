"""
`tdmpc2-moe play`: run a MoE TD-MPC2 checkpoint in its environment and record, per MoE head and per
environment step, how the gate weighs the experts.

Two series per head and step:
- `weights`: the gate's routing vector on the real observation. The head's gate is run on the
  input the head would see for it: the observation for "encoder", the latent z = encode(obs) for
  "pi" and "termination", and [z, a] with the action `a` the agent chose for "dynamics" and
  "reward" (with the task embedding for multitask agents). Only the gate runs, on the columns it reads
  and at its current temperature (no expert, no ring write, no random numbers drawn).
- `plan_weights` / `plan_entropy`: the mean routing vector and the mean routing entropy over every
  gate row the head wrote into its device ring while the planner chose that action (cursor before
  and after `act`; averaged on the device over the last `gate_history_rows` of them at most).
Both are accumulated in device tensors and copied to the host once, at the end
(`--show-weights` copies each step's rows to print them).

A multitask checkpoint (task=mt30 or mt80, or a set of your own: task=<name> tasks=[t1,t2,...], as it was
trained) is played over the tasks `--tasks` names (default: all of the set), `--episodes` episodes each,
with upstream's multitask environment (all of the set's environments are built, as upstream's evaluate.py
does); the gate is probed with the task's index,
and the files and summary gain the per-task routing table and a task x expert heatmap.
"""
import argparse
import os
import sys

import numpy as np
import torch

from ..analysis import gate_plots, gate_stats
from ..families.family import TaskError
from ..settings.checks import first_line
from ..settings.config_keys import checkpoint_overrides
from ..upstream.heads import HEAD_PREFIX, moe_blocks
from ..analysis.recording import GateRecorder, VideoWriter
from ..runs.checkpoint import CheckpointError, model_file

# Overrides applied before the user's: planning is not compiled for a short evaluation run.
_PLAY_DEFAULTS = ["compile=false", "enable_wandb=false", "save_video=false"]


class PlayError(ValueError):
	"""A bad input of `tdmpc2-moe play`, reported as one line on stderr."""


def load_checkpoint(path):
	"""
	Returns `(state, moe_overrides)`: the checkpoint's model dict loaded with weights_only=True on the
	CPU (a patched agent's `save`, or a training checkpoint's model: runs/checkpoint.model_file), and
	the cfg overrides (["use_moe=true", "moe_experts=4", ...]) that rebuild its MoE heads. The
	settings come from the checkpoint's "moe" entry, or, for a checkpoint saved without it, from its
	gate parameters (heads and expert count; top-k and temperature then come from the overrides).
	Raises PlayError for a missing, unreadable or non-MoE checkpoint.
	"""
	if not os.path.isfile(path):
		raise PlayError(f"--checkpoint {path!r}: no such file")
	try:
		state = model_file(path)
	except CheckpointError as exc:
		raise PlayError(f"--checkpoint {path!r}: {exc}") from None
	if not isinstance(state, dict) or not isinstance(state.get("model", state), dict):
		raise PlayError(f"--checkpoint {path!r} is not a TD-MPC2 checkpoint (expected a dict with a 'model' state dict)")
	settings = state.get("moe")
	if isinstance(settings, dict) and settings.get("use_moe"):
		return state, checkpoint_overrides(settings)
	model = state.get("model", state)
	# A MoE head's gate (`<head prefix>.router.gate.weight`, `.gate.weight` before the router had a module of its
	# own) recognises MoE checkpoints saved without settings.
	gates = {head: model[key] for head, prefix in HEAD_PREFIX.items()
			 for key in (f"{prefix}.router.gate.weight", f"{prefix}.gate.weight") if key in model}
	if not gates:
		raise PlayError(f"--checkpoint {path!r} has no MoE heads (plain TD-MPC2, use_moe=false); "
						"train one with use_moe=true")
	experts = {g.shape[0] for g in gates.values()}
	if len(experts) != 1:
		raise PlayError(f"--checkpoint {path!r}: MoE heads disagree on the number of experts {sorted(experts)}")
	return state, ["use_moe=true", f"moe_experts={experts.pop()}", f"moe_heads=[{','.join(gates)}]"]


def _format_row(t, row, task=None):
	parts = [f"step {t:5d}"] if task is None else [f"{task} step {t:5d}"]
	for h, (w, plan) in row.items():
		text = " ".join(f"{x:.2f}" for x in w.tolist())
		if plan is not None:
			text += " | plan " + " ".join(f"{x:.2f}" for x in plan.tolist())
		parts.append(f"{h}: {text}")
	return "  ".join(parts)


def select_tasks(spec, cfg):
	"""
	Returns the indices into `cfg.tasks` of the tasks `spec` names (--tasks: comma-separated names or
	indices; None = all of them), or [None] for a single-task cfg. Raises PlayError naming --tasks.
	"""
	if not cfg.multitask:
		if spec is not None:
			raise PlayError(f"--tasks is for multitask checkpoints (task=mt30, task=mt80, or task=<name> tasks=[...]), "
							f"got task={cfg.task}")
		return [None]
	if spec is None:
		return list(range(len(cfg.tasks)))
	chosen = []
	for item in (x.strip() for x in spec.split(",")):
		if item.isdigit() and int(item) < len(cfg.tasks):
			index = int(item)
		elif item in cfg.tasks:
			index = list(cfg.tasks).index(item)
		else:
			raise PlayError(f"--tasks: {item!r} is not a task of {cfg.task} (give names such as {cfg.tasks[0]!r} "
							f"or indices 0..{len(cfg.tasks) - 1})")
		if index in chosen:
			raise PlayError(f"--tasks names {cfg.tasks[index]!r} twice")
		chosen.append(index)
	return chosen


def build(args, overrides):
	"""
	Returns `(cfg, env, agent, tasks)`: upstream's config with `overrides`, its environment, a
	patched agent on the chosen device and the task indices to play (`select_tasks`). Raises
	PlayError for a bad checkout path, override, task, --tasks or setting.
	"""
	from ..upstream import checkout
	try:
		cfg = checkout.load_cfg(overrides, args.tdmpc2)
	except FileNotFoundError as exc:
		raise PlayError(f"--tdmpc2: {first_line(exc, 200, type(exc).__name__)}") from None
	except Exception as exc:
		raise PlayError(f"cannot compose the TD-MPC2 config with overrides {args.overrides}: {first_line(exc, 200, type(exc).__name__)}") from None
	tasks = select_tasks(args.tasks, cfg)
	from common.seed import set_seed
	from envs import make_env
	from tdmpc2 import TDMPC2
	set_seed(cfg.seed)
	try:
		env = make_env(cfg)
	except TaskError as exc:  # the task family's own line (unknown name, missing package, refused space)
		raise PlayError(str(exc)) from None
	except Exception as exc:
		if cfg.multitask:
			raise PlayError(f"task={cfg.task}: TD-MPC2 could not make the environments of its tasks "
							f"({first_line(exc, 200, type(exc).__name__)})") from None
		raise PlayError(f"unknown task {cfg.task!r}: TD-MPC2 could not make its environment ({first_line(exc, 200, type(exc).__name__)})") from None
	try:
		agent = TDMPC2(cfg)
	except ValueError as exc:  # a bad plugin setting, named by the settings check
		raise PlayError(first_line(exc, 200, type(exc).__name__)) from None
	return cfg, env, agent, tasks


def run(args, cfg, env, agent, out_dir, tasks=(None,)):
	"""
	Runs `args.episodes` evaluation episodes of at most `args.num_steps` steps for each task index
	in `tasks` ([None] for a single-task agent). Returns `(per_head, results, video_note)`: the
	recorded gate series, the results arrays (with `episode_tasks`, indices into `tasks`, when
	multitask) and a line about the video (None when none was asked for).
	"""
	from tqdm import tqdm
	blocks = moe_blocks(agent.model)
	device = agent.device
	video = VideoWriter(os.path.join(out_dir, "video.mp4")) if args.record_video else None
	series, rewards, actions, observations, lengths, episode_tasks = [], [], [], [], [], []
	limits = [cfg.episode_length if task is None else cfg.episode_lengths[task] for task in tasks]
	limits = [min(args.num_steps or n, n) for n in limits]
	bar = tqdm(total=args.episodes * sum(limits), desc="play", unit="step")
	for k, (task, steps) in enumerate(zip(tasks, limits)):
		task_index = None if task is None else torch.tensor([task], device=device)
		label = None if task is None else cfg.tasks[task]
		for _ in range(args.episodes):
			recorder = GateRecorder(blocks, steps, device)
			obs, done, t = env.reset() if task is None else env.reset(task), False, 0
			if video is not None:
				video.add(env)
			while not done and t < steps:
				observations.append(obs)
				recorder.before_act()
				action = agent.act(obs, t0=t == 0, eval_mode=True, task=task)
				recorder.after_act(t)
				recorder.probe(t, agent.model, obs.to(device).unsqueeze(0), action.to(device).unsqueeze(0), task_index)
				if args.show_weights:
					tqdm.write(_format_row(t, recorder.row(t), label))
				obs, reward, done, _ = env.step(action)
				rewards.append(float(reward))
				actions.append(action)
				t += 1
				bar.update(1)
				if video is not None:
					video.add(env)
			series.append(recorder.finish(t))
			lengths.append(t)
			episode_tasks.append(k)
			bar.total -= steps - t
	bar.close()
	per_head = {h: {k: np.concatenate([s[h][k] for s in series]) for k in series[0][h]} for h in blocks}
	bounds = np.cumsum([0] + lengths)
	step_rewards = np.asarray(rewards, dtype=np.float32)
	results = {
		"episode_rewards": np.array([step_rewards[a:b].sum() for a, b in zip(bounds[:-1], bounds[1:])], dtype=np.float32),
		"episode_lengths": np.asarray(lengths, dtype=np.int64),
		"rewards": step_rewards,
		"actions": torch.stack(actions).numpy(),
		"observations": torch.stack(observations).numpy(),
	}
	if tasks[0] is not None:
		results["tasks"] = np.array([cfg.tasks[task] for task in tasks])
		results["episode_tasks"] = np.asarray(episode_tasks, dtype=np.int64)
	note = None
	if video is not None:
		written = video.close()
		note = f"video: {written}" if written else f"video.mp4 not written: {video.problem}"
	return per_head, results, note


def parse_args(argv):
	"""Returns the parsed arguments of `tdmpc2-moe play` (cfg overrides in `.overrides`)."""
	parser = argparse.ArgumentParser(
		prog="tdmpc2-moe play",
		description="Run a MoE TD-MPC2 checkpoint and record how each head's gate weighs the experts.",
		epilog="Outputs in --out: weight_stats.npz, results.npz, summary.md, gates_<head>.png, video.mp4; "
			   "multitask checkpoints (task=mt30, mt80, or task=<name> tasks=[...]) add the per-task table and "
			   "tasks_experts.png.")
	parser.add_argument("--tdmpc2", default=None, help="TD-MPC2 checkout (default: $TDMPC2_ROOT)")
	parser.add_argument("--checkpoint", required=True, help="checkpoint saved by a patched agent")
	parser.add_argument("--episodes", type=int, default=1, help="evaluation episodes (per task when multitask; default 1)")
	parser.add_argument("--tasks", default=None, metavar="T1,T2,...",
						help="multitask checkpoints: tasks to play, names or indices into the task set (default: all)")
	parser.add_argument("--num-steps", type=int, default=None, help="cap on steps per episode (default: the episode length)")
	parser.add_argument("--seed", type=int, default=None, help="seed (default: the cfg's seed)")
	parser.add_argument("--show-weights", action="store_true", help="print every step's gate weights")
	parser.add_argument("--record-video", action="store_true", help="write video.mp4 (needs rendering and imageio)")
	parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
	parser.add_argument("--out", default="play_out", help="output directory (default play_out)")
	parser.add_argument("overrides", nargs="*", metavar="key=value", help="TD-MPC2 cfg overrides, e.g. task=walker-walk model_size=1")
	args = parser.parse_args(argv)
	if args.episodes < 1:
		parser.error(f"--episodes must be >= 1, got {args.episodes}")
	if args.num_steps is not None and args.num_steps < 1:
		parser.error(f"--num-steps must be >= 1, got {args.num_steps}")
	bad = [o for o in args.overrides if "=" not in o]
	if bad:
		parser.error(f"overrides must be key=value, got {bad[0]!r}")
	return args


def play(args):
	"""Runs `tdmpc2-moe play` for parsed `args`; returns the list of written files. Raises PlayError for bad input."""
	try:
		out_dir = gate_stats.check_out_dir(args.out)
	except ValueError as exc:
		raise PlayError(str(exc)) from None
	state, moe_overrides = load_checkpoint(args.checkpoint)
	device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
	if device == "cuda" and not torch.cuda.is_available():
		raise PlayError("--device cuda: CUDA is not available on this machine")
	# Upstream's default MUJOCO_GL; must be set before dm_control is imported.
	os.environ.setdefault("MUJOCO_GL", "egl")
	overrides = _PLAY_DEFAULTS + [f"checkpoint={os.path.abspath(args.checkpoint)}", f"device={device}"] + moe_overrides
	if args.seed is not None:
		overrides.append(f"seed={args.seed}")
	overrides += args.overrides
	from ..upstream.patching import is_patched, patch, unpatch
	patched_here = not is_patched()
	if patched_here:
		patch()
	try:
		cfg, env, agent, tasks = build(args, overrides)
		embeddings = state.get("model", state).get("_task_emb.weight")
		if embeddings is not None and not cfg.multitask:
			raise PlayError(f"--checkpoint {args.checkpoint!r} is a multitask checkpoint ({embeddings.shape[0]} task "
							f"embeddings); play it with the task set it was trained on (task=mt30, task=mt80, or "
							f"task=<name> tasks=[...])")
		if "moe" not in state:
			state = dict(state, moe=agent.model.moe_settings.checkpoint_dict())
		try:
			agent.load(state)
		except (ValueError, RuntimeError) as exc:
			raise PlayError(f"--checkpoint {args.checkpoint!r} does not fit the agent built from the cfg "
							f"(task={cfg.task}, model_size={cfg.get('model_size')}): {first_line(exc, 200, type(exc).__name__)}") from None
		per_head, results, video_note = run(args, cfg, env, agent, out_dir, tasks)
	finally:
		if patched_here:
			unpatch()
	played = (results["tasks"].tolist(), results["episode_tasks"]) if "tasks" in results else None
	written = [gate_stats.save_weight_stats(os.path.join(out_dir, "weight_stats.npz"), per_head, results["episode_lengths"],
											tasks=played)]
	results_path = os.path.join(out_dir, "results.npz")
	with open(results_path, "wb") as f:
		np.savez_compressed(f, **results)
	written.append(results_path)
	episodes = [(cfg.task, np.ones(len(results["episode_lengths"]), dtype=bool))] if played is None else \
		[(name, results["episode_tasks"] == k) for k, name in enumerate(played[0])]
	for name, mine in episodes:
		rewards = ", ".join(f"{r:.1f}" for r in results["episode_rewards"][mine])
		print(f"task {name}: {int(mine.sum())} episode(s), {int(results['episode_lengths'][mine].sum())} steps, "
			  f"episode rewards [{rewards}]")
	written += gate_plots.write_report(out_dir, per_head, results["episode_lengths"], tasks=played)
	if video_note is not None:
		print(video_note)
		if video_note.startswith("video: "):
			written.append(os.path.join(out_dir, "video.mp4"))
	return written


def main(argv=None):
	"""`tdmpc2-moe play ...`; returns the process exit code (1 with one line on stderr for bad input)."""
	args = parse_args(argv)
	try:
		play(args)
	except PlayError as exc:
		print(f"tdmpc2-moe play: error: {exc}", file=sys.stderr)
		return 1
	return 0


if __name__ == "__main__":
	sys.exit(main())
