"""
Plots and the written report of recorded gate weights (`tdmpc2-moe play` and `analyze`): per head a
PNG of histograms, weights over time as a heatmap, box plots and usage bars; for multitask runs a
task x expert heatmap; and `write_report`, which prints the summary and writes it with the PNGs.
Plots are for looking, not decoding: heatmaps rather than overlaid lines. Only matplotlib's Figure
is used (no pyplot, no global backend state).
"""
import os

import numpy as np

from .gate_stats import DOMINANCE, check_tasks, summary_table, task_statistics, task_table, weight_statistics


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

	# Weights over time as a heatmap (experts x steps; with the planner's mean as a second band of rows
	# below a white line): E overlaid lines switching between 0 and 1/k every step cannot be read.
	plan = arrays.get("plan_weights")
	rows = w.T if plan is None else np.vstack([w.T, np.full((1, t), np.nan), np.asarray(plan, dtype=np.float64).T])
	image = ax[0, 1].imshow(rows, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=1)
	for end in np.cumsum(episode_lengths)[:-1]:
		ax[0, 1].axvline(end - 0.5, color="w", linestyle=":", linewidth=1)
	ticks = list(range(e)) + ([e + 1 + i for i in range(e)] if plan is not None else [])
	labels = [str(i) for i in range(e)] + ([f"plan {i}" for i in range(e)] if plan is not None else [])
	title = "weights over time (experts x steps" + ("; below: planner mean)" if plan is not None else ")")
	ax[0, 1].set(title=title, xlabel="environment step", ylabel="expert", yticks=ticks, yticklabels=labels)
	fig.colorbar(image, ax=ax[0, 1], fraction=0.04, label="weight")

	ax[1, 0].boxplot([w[:, i] for i in range(e)], tick_labels=[str(i) for i in range(e)])
	ax[1, 0].set(title="weight distribution per expert", xlabel="expert", ylabel="weight")

	ax[1, 1].bar(np.arange(e), s["usage"], color=colors)
	ax[1, 1].axhline(1.0 / (4 * e), color="r", linestyle=":", linewidth=1, label="collapse threshold 1/(4E)")
	ax[1, 1].set(title=f"usage share (argmax) · balanced steps {s['balanced']:.2f}", xlabel="expert",
				 ylabel="share of steps", xticks=np.arange(e))
	ax[1, 1].legend(fontsize="small")
	fig.savefig(path, dpi=100)
	return path


def plot_task_heatmap(path, per_head, episode_lengths, tasks):
	"""
	Draws, per head, the mean weight of each expert over each task's steps as a task x expert
	heatmap (values written in the cells), into one PNG at `path`. `tasks` is (task_names,
	episode_tasks). Returns `path`.
	"""
	from matplotlib.figure import Figure

	names, episode_tasks = check_tasks(tasks, episode_lengths)
	k = len(names)
	fig = Figure(figsize=(4 + 2.2 * len(per_head), 1.5 + 0.32 * k), layout="constrained")
	axes = np.atleast_1d(fig.subplots(1, len(per_head), sharey=True))
	fig.suptitle("mean gate weight per task and expert")
	means = {head: task_statistics(arrays["weights"], episode_lengths, episode_tasks, k)["mean"]
			 for head, arrays in per_head.items()}
	# One colour scale for all heads, from 0 to the largest mean: dense gates sit near 1/E, and a fixed
	# 0..1 scale would paint them all alike.
	top = max(max(float(m.max()) for m in means.values()), 1e-6)
	for ax, (head, mean) in zip(axes, means.items()):
		e = mean.shape[1]
		image = ax.imshow(mean, vmin=0.0, vmax=top, cmap="viridis", aspect="auto", interpolation="nearest")
		if k * e <= 600:
			for (r, c), v in np.ndenumerate(mean):
				ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize="x-small",
						color="black" if v > 0.6 * top else "white")
		ax.set(title=head, xlabel="expert", xticks=np.arange(e), yticks=np.arange(k), yticklabels=names)
	fig.colorbar(image, ax=list(axes), label="mean weight", shrink=0.8)
	fig.savefig(path, dpi=100)
	return path


def write_report(out_dir, per_head, episode_lengths, dominance=DOMINANCE, tasks=None):
	"""
	Prints the summary table, writes it to `out_dir`/summary.md and one PNG per head
	(`gates_{head}.png`). For a multitask run, `tasks` = (task_names, episode_tasks) adds the
	per-task routing table (printed and in summary.md) and `tasks_experts.png`, the task x expert
	heatmap. Returns the list of written paths.
	"""
	table = summary_table(per_head, dominance)
	if tasks is not None:
		table += "\n" + task_table(per_head, episode_lengths, tasks)
	print(table)
	summary = os.path.join(out_dir, "summary.md")
	with open(summary, "w") as f:
		f.write(table + "\n")
	written = [summary]
	for head, arrays in per_head.items():
		written.append(plot_head(os.path.join(out_dir, f"gates_{head}.png"), head, arrays, episode_lengths, dominance))
	if tasks is not None:
		written.append(plot_task_heatmap(os.path.join(out_dir, "tasks_experts.png"), per_head, episode_lengths, tasks))
	return written
