"""
Statistics, npz I/O and plots of recorded gate weights: the library half of `tdmpc2-moe play` and
`tdmpc2-moe analyze` (their commands live in cli/).

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
The derived arrays are stored for readers of the file; `analyze` recomputes them from the weights,
so its table is the one `play` printed.
"""
import os
import tempfile

import numpy as np

DOMINANCE = 0.7
_DERIVED = ("entropy", "usage", "mean", "std", "dominant", "balanced")
_PLAN = ("plan_weights", "plan_entropy")


def row_entropy(weights):
	"""Returns the entropy (nats) of each row of `weights` [T, E], with 0 * log 0 taken as 0."""
	w = np.asarray(weights, dtype=np.float64)
	logw = np.log(np.where(w > 0, w, 1.0))
	return -(w * logw).sum(-1)


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
	entropy = row_entropy(w64)
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


def save_weight_stats(path, per_head, episode_lengths, dominance=DOMINANCE):
	"""
	Writes `per_head` ({head: {"weights": [T, E], optionally "plan_weights" [T, E], "plan_entropy" [T]}})
	and the derived statistics to `path` (.npz, layout in the module docstring). Returns `path`.
	"""
	if not per_head:
		raise ValueError("per_head must name at least one head")
	lengths = np.asarray(episode_lengths, dtype=np.int64).reshape(-1)
	arrays = {"heads": np.array(list(per_head)), "episode_lengths": lengths,
			  "dominance_threshold": np.float64(dominance)}
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


def plot_head(path, head, arrays, episode_lengths, dominance=DOMINANCE):
	"""
	Draws one head's gate weights into a PNG at `path`: histogram of weights per expert, weights over
	time (planner means dashed, episode boundaries dotted), box plot per expert and usage bars.
	Returns `path`.
	"""
	from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

	w = np.asarray(arrays["weights"], dtype=np.float64)
	t, e = w.shape
	s = weight_statistics(w, dominance)
	colors = [f"C{i % 10}" for i in range(e)]
	fig = Figure(figsize=(12, 8), layout="constrained")
	ax = fig.subplots(2, 2)
	fig.suptitle(f"{head}: gate weights on the real observation's latent (T={t}, E={e})")

	bins = np.linspace(0, 1, 21)
	for i in range(e):
		ax[0, 0].hist(w[:, i], bins=bins, histtype="step", linewidth=1.5, color=colors[i], label=f"expert {i}")
	ax[0, 0].axvline(dominance, color="k", linestyle=":", linewidth=1)
	ax[0, 0].set(title="histogram of weights per expert", xlabel="weight", ylabel="steps")
	ax[0, 0].legend(fontsize="small")

	steps = np.arange(t)
	plan = arrays.get("plan_weights")
	for i in range(e):
		ax[0, 1].plot(steps, w[:, i], color=colors[i], linewidth=1, label=f"expert {i}")
		if plan is not None:
			ax[0, 1].plot(steps, np.asarray(plan)[:, i], color=colors[i], linewidth=1, linestyle="--")
	for end in np.cumsum(episode_lengths)[:-1]:
		ax[0, 1].axvline(end, color="k", linestyle=":", linewidth=1)
	title = "weights over time" + (" (dashed: planner mean)" if plan is not None else "")
	ax[0, 1].set(title=title, xlabel="environment step", ylabel="weight", ylim=(-0.02, 1.02))

	ax[1, 0].boxplot([w[:, i] for i in range(e)], tick_labels=[str(i) for i in range(e)])
	ax[1, 0].set(title="weight distribution per expert", xlabel="expert", ylabel="weight")

	ax[1, 1].bar(np.arange(e), s["usage"], color=colors)
	ax[1, 1].axhline(1.0 / (4 * e), color="r", linestyle=":", linewidth=1, label="collapse threshold 1/(4E)")
	ax[1, 1].set(title=f"usage share (argmax) · balanced steps {s['balanced']:.2f}", xlabel="expert",
				 ylabel="share of steps", xticks=np.arange(e))
	ax[1, 1].legend(fontsize="small")
	fig.savefig(path, dpi=100)
	return path


def write_report(out_dir, per_head, episode_lengths, dominance=DOMINANCE):
	"""
	Prints the summary table, writes it to `out_dir`/summary.md and one PNG per head
	(`gates_{head}.png`). Returns the list of written paths.
	"""
	table = summary_table(per_head, dominance)
	print(table)
	summary = os.path.join(out_dir, "summary.md")
	with open(summary, "w") as f:
		f.write(table + "\n")
	written = [summary]
	for head, arrays in per_head.items():
		written.append(plot_head(os.path.join(out_dir, f"gates_{head}.png"), head, arrays, episode_lengths, dominance))
	return written


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
