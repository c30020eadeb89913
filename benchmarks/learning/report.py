"""
Plot and table of the learning benchmark's results (`learning.py report`): per task, episode return
against environment steps, mean over seeds with the spread (min to max over seeds) shaded, one line
per variant; and a markdown table of the return at fixed steps (mean and each seed), the run's wall
time and resident-memory growth (from the runs), and ms per update / per `act` (from `learning.py
measure`, when its file is there). Only finished runs count; partial ones are listed under the table.
"""
import json
import statistics
from pathlib import Path

from learning import VARIANTS, read_results


def load(out):
	"""
	Returns {task: {variant: {seed: [(step, reward)]}}} of the finished runs under `out`/results,
	{task: {variant: {seed: meta}}} and the list of partial CSVs.
	"""
	runs, metas, partial = {}, {}, []
	for path in sorted(Path(out, "results").glob("*/*/seed*.csv")):
		task, variant = path.parent.parent.name, path.parent.name
		if path.name.endswith(".partial.csv"):
			partial.append(path)
			continue
		seed = int(path.stem[len("seed"):])
		runs.setdefault(task, {}).setdefault(variant, {})[seed] = [(s, r) for s, r, _ in read_results(path)]
		meta = path.with_suffix(".json")
		if meta.is_file():
			metas.setdefault(task, {}).setdefault(variant, {})[seed] = json.loads(meta.read_text())
	return runs, metas, partial


def _order(variants):
	return sorted(variants, key=lambda v: list(VARIANTS).index(v) if v in VARIANTS else len(VARIANTS))


def curves(seeds):
	"""Returns (steps, mean, low, high) over the seeds' common evaluation steps."""
	common = sorted(set.intersection(*(set(s for s, _ in rows) for rows in seeds.values())))
	by_seed = [dict(rows) for rows in seeds.values()]
	values = [[d[s] for d in by_seed] for s in common]
	return common, [statistics.fmean(v) for v in values], [min(v) for v in values], [max(v) for v in values]


def plot(runs, path):
	"""Draws one panel per task (mean line, min-max band over seeds per variant) into PNG `path`."""
	import matplotlib
	matplotlib.use("Agg")
	import matplotlib.pyplot as plt
	tasks = sorted(runs)
	fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
	for ax, task in zip(axes[0], tasks):
		for variant in _order(runs[task]):
			seeds = runs[task][variant]
			steps, mean, low, high = curves(seeds)
			line, = ax.plot(steps, mean, marker="o", ms=3, label=f"{variant} ({len(seeds)} seeds)")
			ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2, lw=0)
		ax.set_title(task)
		ax.set_xlabel("environment steps")
		ax.set_ylabel("eval episode return")
		ax.grid(alpha=0.3)
		ax.legend(loc="lower right")
	fig.suptitle("mean over seeds; shaded: min to max over seeds", fontsize=9)
	fig.tight_layout()
	fig.savefig(path, dpi=110)
	plt.close(fig)


def _steps_for_table(runs, at):
	if at:
		return at
	steps = sorted(set.intersection(*(set(curves(seeds)[0]) for variants in runs.values() for seeds in variants.values())))
	step = max(1, (steps[-1] // 4) if steps else 1)
	return [s for s in steps if s % step == 0]


def table(runs, metas, measures, at=None):
	"""Returns the markdown table: per task and variant, return at the `at` steps, wall time, memory, timings."""
	at = _steps_for_table(runs, at)
	head = ["task", "variant", "seeds"] + [f"return @ {s}" for s in at] + [
		"wall min / run", "RSS growth MB", "ms / update", "ms / act"]
	rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
	for task in sorted(runs):
		for variant in _order(runs[task]):
			seeds = runs[task][variant]
			cells = [task, variant, ", ".join(str(s) for s in sorted(seeds))]
			for s in at:
				values = [dict(seeds[k]).get(s) for k in sorted(seeds)]
				if any(v is None for v in values):
					cells.append("")
					continue
				cells.append(f"{statistics.fmean(values):.0f} ({' / '.join(f'{v:.0f}' for v in values)})")
			meta = metas.get(task, {}).get(variant, {})
			walls = [m["wall_s"] / 60 for m in meta.values()]
			growth = [m["rss_growth_mb"] for m in meta.values() if m.get("rss_growth_mb") is not None]
			cells.append(" / ".join(f"{w:.0f}" for w in walls))
			cells.append(" / ".join(f"{g:+.0f}" for g in growth))
			m = measures.get(task, {}).get(variant, {})
			cells.append(f"{m['ms_per_update']:.0f}" if "ms_per_update" in m else "")
			cells.append(f"{m['ms_per_act']:.0f}" if "ms_per_act" in m else "")
			rows.append("| " + " | ".join(cells) + " |")
	return "\n".join(rows)


def report(out, at=None):
	"""Writes `out`/learning.png and returns the markdown table (plus a line per partial run)."""
	runs, metas, partial = load(out)
	if not runs:
		return f"no finished runs under {Path(out, 'results')}"
	measures = {}
	for path in Path(out, "results").glob("*/measure.json"):
		measures[path.parent.name] = json.loads(path.read_text())
	plot(runs, Path(out, "learning.png"))
	text = table(runs, metas, measures, at)
	if partial:
		text += "\n\nPartial runs (not in the table or plot): " + ", ".join(
			f"{p.parent.parent.name}/{p.parent.name}/{p.name} (to step {read_results(p)[-1][0]})" for p in partial)
	return text
