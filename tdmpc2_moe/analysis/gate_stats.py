"""
Statistics, summary tables and npz I/O of recorded gate weights: the library half of `tdmpc2-moe
play` and `tdmpc2-moe analyze` with gate_plots.py (their commands live in cli/).

`weight_stats.npz` layout (written by `save_weight_stats`, read by `load_weight_stats`):
  heads                  [H] str    names of the MoE heads, in recording order
  episode_lengths        [n] int64  environment steps per episode (they sum to T)
  dominance_threshold    []  float  an expert dominates a step when its weight is above this (0.7)
  {head}/weights         [T, E]     routing weights on the latent of the real observation, per step
  {head}/entropy         [T]        routing entropy of each row (nats)
  {head}/usage           [E]        share of steps where the expert has the largest weight (argmax)
  {head}/mean, {head}/std [E]       mean and standard deviation of each expert's weight over steps
  {head}/dominant        [E]        share of steps where the expert's weight is above the threshold
  {head}/balanced        []         share of steps where no expert is above the threshold
  {head}/plan_weights    [T, E]     optional: mean routing vector over the planner's samples, per step
  {head}/plan_entropy    [T]        optional: mean routing entropy over the planner's samples, per step
Multitask files (a multitask checkpoint played over several tasks) add, and change nothing above:
  tasks                  [K] str    names of the played tasks, in playing order
  episode_tasks          [n] int64  index into `tasks` of each episode (a task's episodes are
                                    contiguous; step t belongs to the episode holding it)
  {head}/task_mean       [K, E]     mean weight of each expert over each task's steps
  {head}/task_usage      [K, E]     share of each task's steps where the expert has the largest weight
  {head}/task_entropy    [K]        mean routing entropy over each task's steps (nats)
A single-task file has none of them (`load_tasks` returns None for it).
The derived arrays are stored for readers of the file; `analyze` recomputes them from the weights,
so its tables are the ones `play` printed.
"""
import os
import tempfile

import numpy as np
import torch

from ..block.routing_stats import row_entropy

DOMINANCE = 0.7
_DERIVED = ("entropy", "usage", "mean", "std", "dominant", "balanced")
_PLAN = ("plan_weights", "plan_entropy")
_TASK_DERIVED = ("task_mean", "task_usage", "task_entropy")


def _entropy(weights):
	# Each row's routing entropy (routing_stats.row_entropy) of a NumPy array [T, E], in float64.
	return row_entropy(torch.from_numpy(np.asarray(weights, dtype=np.float64))).numpy()


def weight_statistics(weights, dominance=DOMINANCE):
	"""
	Returns a dict of statistics of routing weights [T, E] (T >= 1): `entropy` [T], `usage` [E]
	(argmax share; ties go to the lower expert index, like the gate), `mean` [E], `std` [E],
	`dominant` [E] (share of steps with weight > `dominance`), `balanced` [] (share of steps with no
	expert above `dominance`), `mean_entropy` [] and `collapsed` (indices of experts whose usage share
	is under 1 / (4 E)).
	"""
	w = np.asarray(weights)
	if w.ndim != 2 or w.shape[0] < 1 or w.shape[1] < 1:
		raise ValueError(f"weights must be a non-empty [T, E] array, got shape {w.shape}")
	if not np.isfinite(w).all():
		raise ValueError("weights must be finite")
	t, e = w.shape
	w64 = w.astype(np.float64)
	entropy = _entropy(w64)
	usage = np.bincount(w64.argmax(-1), minlength=e) / t
	above = w64 > dominance
	return {
		"entropy": entropy,
		"usage": usage,
		"mean": w64.mean(0),
		"std": w64.std(0),
		"dominant": above.mean(0),
		"balanced": np.float64((~above.any(-1)).mean()),
		"mean_entropy": np.float64(entropy.mean()),
		"collapsed": np.flatnonzero(usage < 1.0 / (4 * e)),
	}


def summary_table(per_head, dominance=DOMINANCE):
	"""
	Returns the summary as markdown text: per head, one row per expert (usage, mean and std of weight,
	dominant share, and the planner's mean weight when recorded), then the balanced share, the mean
	routing entropy and a collapse warning for each expert whose usage share is under 1 / (4 E).
	"""
	lines = ["# Gate weights", ""]
	for head, arrays in per_head.items():
		w = arrays["weights"]
		t, e = w.shape
		s = weight_statistics(w, dominance)
		plan = arrays.get("plan_weights")
		lines.append(f"## {head} (T={t} steps, E={e} experts)")
		lines.append("")
		header = ["expert", "usage", "mean weight", "std weight", f"dominant (>{dominance:g})"]
		if plan is not None:
			header.append("planner mean weight")
		lines.append("| " + " | ".join(header) + " |")
		lines.append("|" + "---|" * len(header))
		for i in range(e):
			row = [str(i), f"{s['usage'][i]:.3f}", f"{s['mean'][i]:.3f}", f"{s['std'][i]:.3f}", f"{s['dominant'][i]:.3f}"]
			if plan is not None:
				row.append(f"{np.asarray(plan, dtype=np.float64)[:, i].mean():.3f}")
			lines.append("| " + " | ".join(row) + " |")
		lines.append("")
		lines.append(f"balanced steps (no expert > {dominance:g}): {s['balanced']:.3f}")
		lines.append(f"mean routing entropy: {s['mean_entropy']:.3f} nats")
		if plan is not None and arrays.get("plan_entropy") is not None:
			lines.append(f"planner mean routing entropy: {np.asarray(arrays['plan_entropy'], dtype=np.float64).mean():.3f} nats")
		for i in s["collapsed"]:
			lines.append(f"WARNING: expert collapse in {head}: expert {i} usage share {s['usage'][i]:.3f} "
						 f"< 1/(4E) = {1.0 / (4 * e):.3f}")
		lines.append("")
	return "\n".join(lines)


def check_tasks(tasks, episode_lengths):
	"""
	Returns `tasks` = (task_names, episode_tasks) as (list of str, int64 array), checked against
	`episode_lengths`: one task index per episode, each in range, each named task played at least one
	step. Raises ValueError naming `tasks` otherwise.
	"""
	try:
		names, episode_tasks = tasks
	except (TypeError, ValueError):
		raise ValueError(f"tasks must be a pair (task_names, episode_tasks), got {tasks!r}") from None
	names = [str(n) for n in names]
	episode_tasks = np.asarray(episode_tasks).reshape(-1)
	lengths = np.asarray(episode_lengths).reshape(-1)
	if not names or any("/" in n for n in names):
		raise ValueError(f"tasks: task_names must be non-empty names without '/', got {names}")
	if episode_tasks.shape != lengths.shape or not np.issubdtype(episode_tasks.dtype, np.integer):
		raise ValueError(f"tasks: episode_tasks must hold one integer per episode ({lengths.size}), "
						 f"got {episode_tasks.dtype} of shape {episode_tasks.shape}")
	if episode_tasks.size and (episode_tasks.min() < 0 or episode_tasks.max() >= len(names)):
		raise ValueError(f"tasks: episode_tasks must index task_names (0..{len(names) - 1}), got {episode_tasks.tolist()}")
	steps = np.bincount(episode_tasks, weights=lengths, minlength=len(names))
	if (steps == 0).any():
		raise ValueError(f"tasks: task {names[int(np.flatnonzero(steps == 0)[0])]!r} has no recorded step")
	return names, episode_tasks.astype(np.int64)


def task_statistics(weights, episode_lengths, episode_tasks, n_tasks):
	"""
	Returns per-task statistics of routing weights [T, E], step t belonging to the task of its
	episode: `steps` [K], `mean` [K, E] (mean weight per task and expert), `usage` [K, E] (share of
	the task's steps where the expert has the largest weight, ties to the lower index) and
	`entropy` [K] (mean routing entropy, nats). Every task must have at least one step.
	"""
	w = np.asarray(weights, dtype=np.float64)
	e = w.shape[1]
	step_task = np.repeat(np.asarray(episode_tasks, dtype=np.int64), np.asarray(episode_lengths, dtype=np.int64))
	steps = np.bincount(step_task, minlength=n_tasks).astype(np.float64)
	mean = np.stack([np.bincount(step_task, weights=w[:, i], minlength=n_tasks) for i in range(e)], 1) / steps[:, None]
	top = np.zeros((n_tasks, e))
	np.add.at(top, (step_task, w.argmax(-1)), 1.0)
	entropy = np.bincount(step_task, weights=_entropy(w), minlength=n_tasks) / steps
	return {"steps": steps.astype(np.int64), "mean": mean, "usage": top / steps[:, None], "entropy": entropy}


def task_table(per_head, episode_lengths, tasks):
	"""
	Returns the per-task routing table as markdown: per head, one row per task with its steps, the
	mean weight of every expert, the expert of largest mean weight and the mean routing entropy.
	`tasks` is (task_names, episode_tasks) as `load_tasks` returns it.
	"""
	names, episode_tasks = check_tasks(tasks, episode_lengths)
	lines = ["# Routing per task", ""]
	for head, arrays in per_head.items():
		e = arrays["weights"].shape[1]
		s = task_statistics(arrays["weights"], episode_lengths, episode_tasks, len(names))
		lines.append(f"## {head} (mean weight per task and expert, E={e})")
		lines.append("")
		header = ["task", "steps"] + [f"expert {i}" for i in range(e)] + ["top expert", "entropy"]
		lines.append("| " + " | ".join(header) + " |")
		lines.append("|" + "---|" * len(header))
		for k, name in enumerate(names):
			row = [name, str(s["steps"][k])] + [f"{x:.3f}" for x in s["mean"][k]]
			row += [str(int(s["mean"][k].argmax())), f"{s['entropy'][k]:.3f}"]
			lines.append("| " + " | ".join(row) + " |")
		lines.append("")
	return "\n".join(lines)


def save_weight_stats(path, per_head, episode_lengths, dominance=DOMINANCE, tasks=None):
	"""
	Writes `per_head` ({head: {"weights": [T, E], optionally "plan_weights" [T, E], "plan_entropy" [T]}})
	and the derived statistics to `path` (.npz, layout in the module docstring). `tasks`, for a
	multitask run, is (task_names, episode_tasks) and adds the per-task arrays. Returns `path`.
	"""
	if not per_head:
		raise ValueError("per_head must name at least one head")
	lengths = np.asarray(episode_lengths, dtype=np.int64).reshape(-1)
	arrays = {"heads": np.array(list(per_head)), "episode_lengths": lengths,
			  "dominance_threshold": np.float64(dominance)}
	if tasks is not None:
		names, episode_tasks = check_tasks(tasks, lengths)
		arrays.update(tasks=np.array(names), episode_tasks=episode_tasks)
	for head, data in per_head.items():
		if "/" in head:
			raise ValueError(f"per_head names must not contain '/', got {head!r}")
		w = np.asarray(data["weights"], dtype=np.float32)
		if w.ndim != 2 or w.shape[0] != lengths.sum():
			raise ValueError(f"per_head[{head!r}]['weights'] must be [T, E] with T = sum(episode_lengths) = "
							 f"{lengths.sum()}, got shape {w.shape}")
		s = weight_statistics(w, dominance)
		arrays[f"{head}/weights"] = w
		for key in _DERIVED:
			arrays[f"{head}/{key}"] = s[key]
		for key in _PLAN:
			if data.get(key) is not None:
				arrays[f"{head}/{key}"] = np.asarray(data[key], dtype=np.float32)
		if tasks is not None:
			t = task_statistics(w, lengths, episode_tasks, len(names))
			for key in _TASK_DERIVED:
				arrays[f"{head}/{key}"] = t[key.split("_", 1)[1]]
	with open(path, "wb") as f:
		np.savez_compressed(f, **arrays)
	return path


def load_weight_stats(path):
	"""
	Reads a file written by `save_weight_stats`. Returns `(per_head, episode_lengths, dominance)`:
	per_head maps each head to a dict of its arrays (keys as in the layout, without the head prefix).
	Raises ValueError when `path` is missing or is not such a file.
	"""
	if not os.path.isfile(path):
		raise ValueError(f"path {path!r}: no such file")
	try:
		with np.load(path, allow_pickle=False) as data:
			files = {k: data[k] for k in data.files}
	except Exception as exc:
		raise ValueError(f"path {path!r} is not a readable .npz file ({type(exc).__name__}: {exc})") from None
	missing = [k for k in ("heads", "episode_lengths", "dominance_threshold") if k not in files]
	if missing:
		raise ValueError(f"path {path!r} is not a weight_stats.npz file (missing {', '.join(missing)})")
	per_head = {}
	for head in files["heads"].tolist():
		if f"{head}/weights" not in files:
			raise ValueError(f"path {path!r} lists head {head!r} but has no {head}/weights")
		per_head[head] = {k.split("/", 1)[1]: v for k, v in files.items() if k.startswith(head + "/")}
		if per_head[head]["weights"].ndim != 2:
			raise ValueError(f"path {path!r}: {head}/weights must be [T, E], got shape {per_head[head]['weights'].shape}")
	return per_head, files["episode_lengths"], float(files["dominance_threshold"])


def load_tasks(path):
	"""
	Returns (task_names, episode_tasks) of a multitask weight_stats.npz at `path`, None for a
	single-task one. Raises ValueError when `path` is not a readable weight_stats.npz or its task
	arrays do not fit its episodes.
	"""
	_, episode_lengths, _ = load_weight_stats(path)
	with np.load(path, allow_pickle=False) as data:
		if "tasks" not in data.files and "episode_tasks" not in data.files:
			return None
		if "tasks" not in data.files or "episode_tasks" not in data.files:
			raise ValueError(f"path {path!r} has only one of 'tasks' and 'episode_tasks'")
		tasks = (data["tasks"].tolist(), data["episode_tasks"])
	try:
		return check_tasks(tasks, episode_lengths)
	except ValueError as exc:
		raise ValueError(f"path {path!r}: {exc}") from None


def check_out_dir(out_dir):
	"""Creates `out_dir` if needed. Returns it; raises ValueError naming --out when it cannot be written."""
	try:
		os.makedirs(out_dir, exist_ok=True)
	except OSError as exc:
		raise ValueError(f"--out {out_dir!r} cannot be created ({exc.strerror})") from None
	try:
		# A real write: os.access says yes to root even on a read-only mount.
		with tempfile.TemporaryFile(dir=out_dir):
			pass
	except OSError as exc:
		raise ValueError(f"--out {out_dir!r} is not writable ({exc.strerror})") from None
	return out_dir
