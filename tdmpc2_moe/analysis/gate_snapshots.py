"""
Routing over training: every `gate_snapshot_interval` updates a patched agent copies each MoE head's
gate ring to the host once and writes it, with its statistics, to `work_dir/gates/step_<update>.npz`
plus a PNG (weights heatmap and routing entropy over the snapshot, as the fork's plot_expert_gating
drew them). `tdmpc2-moe analyze DIR` reads those files back and plots usage share per expert (the
routing-weight share for a head that routes densely, where usage is 1/E by construction) and
entropy against the update step, per head.

The host copy happens in the update that reaches the interval (the ring is overwritten after it);
compressing the file and drawing the PNG run on one background thread, off the update's path.

`step_<update>.npz` layout:
  step                 []       updates done when the snapshot was taken
  heads                [H] str  the MoE heads
  {head}/weights       [R, E]   the latest R (at most SNAPSHOT_ROWS) routing vectors of the ring, oldest first
  {head}/usage         [E]      share of routing slots per expert, over the whole ring
  {head}/mean_weight   [E]      mean routing weight per expert, over the whole ring
  {head}/entropy       []       mean routing entropy (nats), over the whole ring
  {head}/rows          []       rows in the ring
  {head}/temperature   []       the gate's temperature (the adapted one when it adapts)
"""
import concurrent.futures
import os
import re

import numpy as np
import torch

from ..block.routing_stats import row_entropy, summarize

SNAPSHOT_ROWS = 2048
_FILE = re.compile(r"^step_(\d+)\.npz$")


def snapshot_arrays(blocks, step):
	"""Returns the npz arrays of one snapshot of `blocks` ({head: MoEBlock with a history}) at update `step`."""
	arrays = {"step": np.int64(step), "heads": np.array(list(blocks))}
	for head, block in blocks.items():
		ring = block.history.snapshot()  # the one host copy; its statistics are computed there, off the device
		stats = summarize(ring)
		for key in ("usage", "mean_weight", "entropy", "rows"):
			arrays[f"{head}/{key}"] = np.asarray(stats[key])
		arrays[f"{head}/weights"] = ring[-SNAPSHOT_ROWS:].numpy()
		arrays[f"{head}/temperature"] = np.float64(block.router.temperature.item())
	return arrays


def _write(path, arrays):
	with open(path, "wb") as f:
		np.savez_compressed(f, **arrays)
	plot_snapshot(path[:-len(".npz")] + ".png", arrays)
	return path


def plot_snapshot(path, arrays):
	"""Draws one snapshot: per head, the weights as a heatmap (experts x rows) and the routing entropy per row."""
	from matplotlib.figure import Figure  # no pyplot: no global state, safe off the main thread

	heads = [str(h) for h in arrays["heads"]]
	fig = Figure(figsize=(12, 3.2 * len(heads)), layout="constrained")
	axes = fig.subplots(len(heads), 2, squeeze=False, width_ratios=[3, 1])
	fig.suptitle(f"gate weights at update {int(arrays['step'])} (latest {SNAPSHOT_ROWS} rows of each ring)")
	for (heat, ent), head in zip(axes, heads):
		w = arrays[f"{head}/weights"]
		image = heat.imshow(w.T, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=1)
		heat.set(title=f"{head}: weights (experts x rows)", xlabel="row (oldest -> newest)", ylabel="expert",
				 yticks=np.arange(w.shape[1]))
		fig.colorbar(image, ax=heat, fraction=0.03)
		ent.plot(row_entropy(torch.from_numpy(w)).numpy(), linewidth=0.5)
		ent.set(title=f"entropy (mean {float(arrays[f'{head}/entropy']):.3f} nats)", xlabel="row", ylabel="nats")
	fig.savefig(path, dpi=80)
	return path


class GateSnapshots:
	"""
	Takes a snapshot of a model's MoE heads every `interval` updates into `directory`; `step(blocks)`
	is called once per update. Writing runs on one background thread; `wait()` blocks until every
	file is written (and re-raises a failed write).
	"""

	def __init__(self, interval, directory):
		self.interval, self.directory = interval, str(directory)
		self.updates = 0
		self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="gate-snapshots")
		self._pending = []

	def step(self, blocks):
		"""Counts one update; at every `interval`-th, copies the rings of `blocks` to the host and queues the files."""
		self.updates += 1
		if self.updates % self.interval or not blocks:
			return
		os.makedirs(self.directory, exist_ok=True)
		arrays = snapshot_arrays(blocks, self.updates)
		path = os.path.join(self.directory, f"step_{self.updates}.npz")
		for finished in [f for f in self._pending if f.done()]:
			finished.result()  # re-raises a failed write here rather than never
		self._pending = [f for f in self._pending if not f.done()]
		self._pending.append(self._pool.submit(_write, path, arrays))

	def wait(self):
		"""Blocks until the queued writes finish; returns their paths (re-raises a failed write)."""
		done, self._pending = self._pending, []
		return [f.result() for f in done]


def load_snapshots(directory):
	"""
	Returns [(step, {head: {key: array}})] of the `step_*.npz` files in `directory` (or its `gates/`),
	sorted by step. Raises ValueError when there are none.
	"""
	if os.path.isdir(os.path.join(directory, "gates")):
		directory = os.path.join(directory, "gates")
	names = sorted((int(m.group(1)), n) for n in os.listdir(directory) if (m := _FILE.match(n)))
	if not names:
		raise ValueError(f"{directory!r} has no step_<update>.npz gate snapshots (train with gate_snapshot_interval=N)")
	out = []
	for step, name in names:
		with np.load(os.path.join(directory, name), allow_pickle=False) as data:
			files = {k: data[k] for k in data.files}
		heads = {str(h): {k.split("/", 1)[1]: v for k, v in files.items() if k.startswith(f"{h}/")}
				 for h in files["heads"]}
		out.append((step, heads))
	return out


def training_table(snapshots):
	"""
	Returns a markdown table: per snapshot and head, the entropy, the largest usage share, each
	expert's usage (share of routing slots) and mean routing weight, and the temperature.
	"""
	lines = ["| update | head | entropy (nats) | max usage | usage per expert | mean weight per expert | temperature |",
			 "|---|---|---|---|---|---|---|"]
	for step, heads in snapshots:
		for head, a in heads.items():
			usage = " ".join(f"{u:.2f}" for u in a["usage"])
			weight = " ".join(f"{w:.3f}" for w in a["mean_weight"])
			lines.append(f"| {step} | {head} | {float(a['entropy']):.3f} | {float(np.max(a['usage'])):.2f} | {usage} "
						 f"| {weight} | {float(a['temperature']):.3f} |")
	return "\n".join(lines)


def _routes_densely(arrays):
	"""Returns whether every stored routing vector of a head weights every expert (top_k == E, as the fork preset)."""
	weights = arrays["weights"]
	return weights.size > 0 and bool((weights > 0).all())


def plot_training(path, snapshots):
	"""
	Draws, per head, the share per expert (stacked areas) and the mean routing entropy against the
	update step. The share is the usage (share of routing slots) for a top-k head; for a head that
	routes densely (every expert on every row) the usage is 1/E by construction, so its panel shows
	the share of routing weight instead.
	"""
	from matplotlib.figure import Figure

	steps = np.array([s for s, _ in snapshots])
	heads = list(snapshots[-1][1])
	fig = Figure(figsize=(11, 3.2 * len(heads)), layout="constrained")
	axes = fig.subplots(len(heads), 2, squeeze=False)
	fig.suptitle("routing over training (gate snapshots)")
	for (area, ent), head in zip(axes, heads):
		dense = _routes_densely(snapshots[-1][1][head])
		key, what = ("mean_weight", "routing weight share (dense)") if dense else ("usage", "usage share")
		share = np.stack([h[head][key] for _, h in snapshots if head in h], axis=1)
		area.stackplot(steps, share, labels=[f"expert {i}" for i in range(share.shape[0])])
		area.set(title=f"{head}: {what} per expert", xlabel="update", ylabel="share", ylim=(0, 1))
		area.legend(fontsize="small", loc="upper left", ncols=min(share.shape[0], 4))
		ent.plot(steps, [float(h[head]["entropy"]) for _, h in snapshots if head in h], marker="o")
		ent.set(title=f"{head}: mean routing entropy", xlabel="update", ylabel="nats")
	fig.savefig(path, dpi=90)
	return path


def write_training_report(directory, out_dir, name="routing_over_training", echo=print):
	"""
	Writes the training table of the snapshots in `directory` to `out_dir`/`name`.md and its plot to
	`name`.png, passing the table to `echo` (None: silent); returns the written paths [md, png].
	"""
	snapshots = load_snapshots(directory)
	table = training_table(snapshots)
	if echo is not None:
		echo(table)
	summary = os.path.join(out_dir, f"{name}.md")
	with open(summary, "w") as f:
		f.write(table + "\n")
	return [summary, plot_training(os.path.join(out_dir, f"{name}.png"), snapshots)]
