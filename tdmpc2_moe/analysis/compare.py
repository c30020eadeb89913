"""
`tdmpc2-moe compare DIR [DIR ...] [--out OUT] [--by key ...]`: the results of training runs, grouped.

Reads every run under the directories: upstream's `logs/<task>/<seed>/<exp_name>/eval.csv` (one row
per evaluation: step, episode_reward) with the run's `config.yaml` and `run.json` (written by
`tdmpc2-moe train`, sweeps included). Runs are grouped per task into variants by the config keys
that differ between the runs (or `--by`); a run without `config.yaml` is described by its path
(task, seed, exp_name). Writes `compare.md` and `compare.csv` (return at fixed steps: mean and min to
max over seeds, runs counted, wall minutes and ms per environment step where `run.json` has them) and
one PNG per task (mean line, min-max band, environment steps on x), and says what it read and what it
skipped: a run without evaluations, or a partial run (its `run.json` not finished, or its last
evaluation short of the run's steps).
"""
import csv
import json
import re
import statistics
from pathlib import Path

# Keys that never make a variant: they name the run, not the model or the training.
NOT_VARIANT = ("seed", "task", "exp_name", "work_dir", "checkpoint", "resume", "data_dir", "wandb_project",
			   "wandb_entity", "enable_wandb", "save_video", "save_agent", "save_csv", "gate_snapshot_interval")


def _flat(cfg, prefix=""):
	out = {}
	for k, v in cfg.items():
		if isinstance(v, dict):
			out.update(_flat(v, f"{prefix}{k}."))
		else:
			out[f"{prefix}{k}"] = v
	return out


def read_runs(dirs):
	"""Returns (runs, skipped): runs as dicts {path, task, seed, config, evals [(step, return)], run}; skipped as (path, why)."""
	from omegaconf import OmegaConf
	runs, skipped = [], []
	for path in sorted({p.parent for d in dirs for p in Path(d).rglob("eval.csv")}):
		with open(path / "eval.csv") as f:
			evals = [(float(r["step"]), float(r["episode_reward"])) for r in csv.DictReader(f)]
		if not evals:
			skipped.append((path, "no evaluations in eval.csv"))
			continue
		config = _flat(OmegaConf.to_container(OmegaConf.load(path / "config.yaml"))) \
			if (path / "config.yaml").is_file() else {"exp_name": path.name}
		info = json.loads((path / "run.json").read_text()) if (path / "run.json").is_file() else None
		task = str(config.get("task", path.parent.parent.name))
		seed = config.get("seed", path.parent.name)
		steps = config.get("steps")
		if info is not None and info.get("status") != "finished":
			skipped.append((path, f"partial run (run.json says {info.get('status')}; last evaluation at step {evals[-1][0]:.0f})"))
			continue
		if isinstance(steps, int) and info is None and evals[-1][0] < steps - config.get("eval_freq", steps):
			skipped.append((path, f"partial run (last evaluation at step {evals[-1][0]:.0f} of {steps})"))
			continue
		runs.append(dict(path=path, task=task, seed=seed, config=config, evals=evals, run=info))
	return runs, skipped


def variant_keys(runs, by=None):
	"""Returns the keys that name variants: `by`, or the config keys whose value differs between runs of a task."""
	if by:
		return list(by)
	keys = set()
	for task in {r["task"] for r in runs}:
		group = [r["config"] for r in runs if r["task"] == task]
		for k in set().union(*group):
			if k not in NOT_VARIANT and len({json.dumps(c.get(k), sort_keys=True, default=str) for c in group}) > 1:
				keys.add(k)
	if not keys and len({r["config"].get("exp_name") for r in runs}) > 1:
		keys.add("exp_name")
	return sorted(keys)


def group(runs, keys):
	"""Returns {task: {variant label: [runs]}}, labels "key=value ..." (or "all" when no key differs)."""
	out = {}
	for r in runs:
		label = " ".join(f"{k}={r['config'].get(k)}" for k in keys) or "all"
		out.setdefault(r["task"], {}).setdefault(label, []).append(r)
	return out


def table(groups, at=None):
	"""Returns (markdown, csv rows): return at the steps `at` (default: every evaluated step) per task and variant."""
	md, rows = [], []
	for task, variants in groups.items():
		steps = at or sorted({s for rs in variants.values() for r in rs for s, _ in r["evals"]})
		md += [f"### {task}", "", "| variant | runs | " + " | ".join(f"return @ {s:.0f}" for s in steps)
			   + " | wall min / run | ms / env step |", "|---|---|" + "---|" * len(steps) + "---|---|"]
		for label, rs in variants.items():
			cells = []
			for s in steps:
				values = [dict(r["evals"]).get(s) for r in rs]
				values = [v for v in values if v is not None]
				cells.append("-" if not values else f"{statistics.fmean(values):.1f} ({min(values):.1f} to {max(values):.1f})")
				rows.append(dict(task=task, variant=label, step=s, runs=len(values),
								 mean=statistics.fmean(values) if values else "", min=min(values) if values else "",
								 max=max(values) if values else ""))
			walls = [r["run"]["wall_s"] for r in rs if r["run"]]
			per_step = [1000 * r["run"]["wall_s"] / r["run"]["steps"] for r in rs if r["run"] and r["run"].get("steps")]
			wall = " / ".join(f"{w / 60:.1f}" for w in walls) or "-"
			ms = f"{statistics.median(per_step):.1f}" if per_step else "-"
			md.append(f"| {label} | {len(rs)} | {' | '.join(cells)} | {wall} | {ms} |")
		md.append("")
	return "\n".join(md), rows


def plot(task, variants, path):
	"""Draws one panel for `task`: per variant the mean return over seeds against environment steps, min-max band."""
	import matplotlib
	matplotlib.use("Agg")
	import matplotlib.pyplot as plt
	fig, ax = plt.subplots(figsize=(6, 3.8))
	for label, rs in variants.items():
		steps = sorted({s for r in rs for s, _ in r["evals"]})
		values = [[dict(r["evals"])[s] for r in rs if s in dict(r["evals"])] for s in steps]
		line, = ax.plot(steps, [statistics.fmean(v) for v in values], marker="o", ms=3, label=f"{label} ({len(rs)} runs)")
		ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], color=line.get_color(), alpha=0.2, lw=0)
	ax.set_title(f"{task}: mean over seeds; shaded: min to max", fontsize=9)
	ax.set_xlabel("environment steps")
	ax.set_ylabel("episode return")
	ax.grid(alpha=0.3)
	ax.legend(fontsize=7)
	fig.tight_layout()
	fig.savefig(path, dpi=110)
	plt.close(fig)


def plot_name(task):
	"""Returns the file name of `task`'s plot: the task with every run of characters a file name should not hold
	(a Gymnasium id's `:` and `/`, as in gym:ALE/Pong-v5) made one `_`, then `.png`."""
	return re.sub(r"[^A-Za-z0-9._-]+", "_", task) + ".png"


def compare(dirs, out, by=None, at=None):
	"""Reads, groups and writes compare.md, compare.csv and one `plot_name(task)` per task into `out`; returns the lines to print."""
	runs, skipped = read_runs(dirs)
	out = Path(out)
	out.mkdir(parents=True, exist_ok=True)
	keys = variant_keys(runs, by)
	groups = group(runs, keys)
	text, rows = table(groups, at)
	(out / "compare.md").write_text(text)
	with open(out / "compare.csv", "w", newline="") as f:
		writer = csv.DictWriter(f, fieldnames=["task", "variant", "step", "runs", "mean", "min", "max"])
		writer.writeheader()
		writer.writerows(rows)
	for task, variants in groups.items():
		plot(task, variants, out / plot_name(task))
	lines = [f"read {len(runs)} runs under {', '.join(map(str, dirs))}; variants by {', '.join(keys) or 'nothing'}"]
	lines += [f"skipped {p}: {why}" for p, why in skipped]
	lines += [text, f"wrote {out / 'compare.md'}, {out / 'compare.csv'} and " + ", ".join(plot_name(t) for t in groups)]
	return lines
