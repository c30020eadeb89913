"""
Plot and table of the learning benchmark's results (`learning.py report`): per task, episode return
against environment steps, mean over seeds with the spread (min to max over seeds) shaded, one line
per variant; and a markdown table of the return at fixed steps (mean and each seed), the run's wall
time and resident-memory growth (from the runs), and ms per update / per `act` (from `learning.py
measure`, when its file is there). Only finished runs enter the means; unfinished ones (their
`.partial.csv`) are drawn dashed and get a row of their own.
"""
import json
import statistics
from pathlib import Path

from learning import VARIANTS, read_results, rss_growth


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


def plot(runs, path, partial=()):
	"""
	Draws one panel per task (mean line, min-max band over seeds per variant) into PNG `path`; the
	`partial` CSVs of unfinished runs as thin dashed lines of their own, outside the mean.
	"""
	import matplotlib
	matplotlib.use("Agg")
	import matplotlib.pyplot as plt
	tasks = sorted(set(runs) | {p.parent.parent.name for p in partial})
	fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
	for ax, task in zip(axes[0], tasks):
		colors = {}
		for variant in _order(set(runs.get(task, {})) | {p.parent.name for p in partial if p.parent.parent.name == task}):
			seeds = runs.get(task, {}).get(variant)
			if seeds:
				steps, mean, low, high = curves(seeds)
				line, = ax.plot(steps, mean, marker="o", ms=3, label=f"{variant} ({len(seeds)} seed{'s' * (len(seeds) > 1)})")
				ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2, lw=0)
				colors[variant] = line.get_color()
			for p in partial:
				if p.parent.parent.name == task and p.parent.name == variant:
					rows = read_results(p)
					line, = ax.plot([r[0] for r in rows], [r[1] for r in rows], ls="--", lw=1, marker=".",
									color=colors.get(variant), label=f"{variant} {p.name.split('.')[0]} (unfinished)")
					colors.setdefault(variant, line.get_color())
		ax.set_title(task)
		ax.set_xlabel("environment steps")
		ax.set_ylabel("eval episode return")
		ax.grid(alpha=0.3)
		ax.legend(loc="best", fontsize=8)
	fig.suptitle("mean over seeds; shaded: min to max over seeds", fontsize=9)
	fig.tight_layout()
	fig.savefig(path, dpi=110)
	plt.close(fig)


def _steps_for_table(runs, at):
	"""Returns `at`, or else 0 and every quarter of the finished runs' common evaluation steps."""
	if at:
		return at
	steps = sorted(set.intersection(*(set(curves(seeds)[0]) for variants in runs.values() for seeds in variants.values())))
	step = max(1, (steps[-1] // 4) if steps else 1)
	return [s for s in steps if s % step == 0]


def _growth(meta):
	"""Returns a run's resident-memory growth, recomputed from its samples and settings (learning.rss_growth)."""
	if "rss" not in meta:
		return meta.get("rss_growth_mb")
	setting = dict(o.split("=", 1) for o in meta["overrides"])
	return rss_growth(meta["rss"], int(setting["eval_freq"]), int(setting["seed_steps"]))


def table(runs, metas, measures, at=None, partial=()):
	"""
	Returns the markdown table: per task and variant, return at the `at` steps (mean over seeds, then
	each seed), wall time, memory, timings; then one row per unfinished run (`partial` CSVs).
	"""
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
			growth = [g for g in map(_growth, meta.values()) if g is not None]
			cells.append(" / ".join(f"{w:.0f}" for w in walls))
			cells.append(" / ".join(f"{g:+.0f}" for g in growth))
			m = measures.get(task, {}).get(variant, {})
			cells.append(f"{m['ms_per_update']:.0f}" if "ms_per_update" in m else "")
			cells.append(f"{m['ms_per_act']:.0f}" if "ms_per_act" in m else "")
			rows.append("| " + " | ".join(cells) + " |")
	for p in partial:
		evals = {step: reward for step, reward, _ in read_results(p)}
		cells = [p.parent.parent.name, f"{p.parent.name}, unfinished (to step {max(evals)})", p.name.split(".")[0][4:]]
		m = measures.get(p.parent.parent.name, {}).get(p.parent.name, {})
		cells += [f"{evals[s]:.0f}" if s in evals else "" for s in at] + ["", ""]
		cells += [f"{m[k]:.0f}" if k in m else "" for k in ("ms_per_update", "ms_per_act")]
		rows.append("| " + " | ".join(cells) + " |")
	return "\n".join(rows)


def report(out, at=None):
	"""Writes `out`/learning.png and returns the markdown table (plus a line per partial run)."""
	runs, metas, partial = load(out)
	if not runs and not partial:
		return f"no finished runs under {Path(out, 'results')}"
	measures = {}
	for path in Path(out, "results").glob("*/measure.json"):
		measures[path.parent.name] = json.loads(path.read_text())
	plot(runs, Path(out, "learning.png"), partial)
	return table(runs, metas, measures, at, partial) if runs else "no finished runs"
