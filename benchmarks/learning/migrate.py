"""
Moves results of the learning benchmark's old process runner (`learning.py run`, which the sweep
replaced) into the layout `tdmpc2-moe compare` reads, so that the committed runs and new sweeps are
read, tabled and drawn by the same command. It was run once on `results/`; it is kept for results of
the old runner elsewhere and as the record of how the committed files were derived.

	python benchmarks/learning/migrate.py benchmarks/learning/results

Old layout, per task, variant and seed: `<task>/<variant>/seed<N>.csv` (upstream's results format
`step,reward,seed`, rewards to one decimal), `seed<N>.json` (the exact command, its overrides, wall
time, resident-memory samples) and, for MoE variants, `seed<N>.routing.png` / `.md` (routing over
training, `gate_snapshots.write_training_report`). New layout, as upstream's work_dir
`logs/<task>/<seed>/<exp_name>/` (exp_name was the variant's name):
- `eval.csv`: upstream's eval log columns, `step,episode_reward`, the same rows;
- `config.yaml`: the run's keys from its recorded command (only those: the rest of the config was
  upstream's and the plugin's defaults of the day, which this code cannot reconstruct);
- `run.json`: `status` finished, `wall_s` and `steps` (what `tdmpc2-moe train` writes), plus the old
  record's `command` and `rss` samples ([seconds, last evaluated step, MB]) and `produced_by`;
- `routing_over_training.png` / `.md`: the routing files, under the name `tdmpc2-moe analyze` gives them.
Unfinished runs (`seed<N>.partial.csv`) are left where they are and named.
"""
import argparse
import csv
import json
import os
import sys
from pathlib import Path

PRODUCED_BY = "benchmarks/learning/learning.py run (the process runner before tdmpc2-moe train -m)"


def old_runs(root):
	"""Returns [(csv path, json path)] of the finished runs of the old layout under `root`."""
	return [(p, p.with_suffix(".json")) for p in sorted(Path(root).glob("*/*/seed*.csv"))
			if not p.name.endswith(".partial.csv") and p.with_suffix(".json").is_file()]


def config_of(overrides):
	"""Returns the run's keys as a config dict, values typed as Hydra reads them (`use_moe=false` -> False)."""
	from omegaconf import OmegaConf
	return OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)))


def migrate_run(csv_path, json_path, root):
	"""Writes one old run's files into `root`/<task>/<seed>/<exp_name>/ and removes the old ones; returns the new directory."""
	from omegaconf import OmegaConf
	record = json.loads(Path(json_path).read_text())
	config = config_of(record["overrides"])
	with open(csv_path) as f:
		rows = list(csv.DictReader(f))
	if not rows or list(rows[0]) != ["step", "reward", "seed"]:
		raise ValueError(f"{csv_path}: not a results CSV of the old runner (step,reward,seed)")
	if int(rows[-1]["step"]) != config["steps"]:
		raise ValueError(f"{csv_path}: ends at step {rows[-1]['step']}, the run's steps are {config['steps']}")
	out = Path(root) / str(config["task"]) / str(config["seed"]) / str(config["exp_name"])
	out.mkdir(parents=True, exist_ok=True)
	with open(out / "eval.csv", "w", newline="") as f:
		writer = csv.writer(f)
		writer.writerow(["step", "episode_reward"])
		writer.writerows((r["step"], r["reward"]) for r in rows)
	OmegaConf.save(OmegaConf.create(config), out / "config.yaml")
	(out / "run.json").write_text(json.dumps(dict(
		status="finished", wall_s=record["wall_s"], steps=config["steps"], produced_by=PRODUCED_BY,
		command=record["command"], rss=record.get("rss", [])), indent=1) + "\n")
	for suffix in (".png", ".md"):
		routing = Path(csv_path).with_name(f"{Path(csv_path).stem}.routing{suffix}")
		if routing.is_file():
			os.replace(routing, out / f"routing_over_training{suffix}")
	Path(csv_path).unlink()
	Path(json_path).unlink()
	return out


def migrate(root):
	"""Migrates every finished old run under `root` in place; returns (new directories, unfinished CSVs left)."""
	done = [migrate_run(c, j, root) for c, j in old_runs(root)]
	for d in sorted(Path(root).glob("*/*"), reverse=True):
		if d.is_dir() and not any(d.iterdir()):
			d.rmdir()
	return done, sorted(Path(root).glob("*/*/seed*.partial.csv"))


def main(argv=None):
	parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
	parser.add_argument("root", help="the old runner's results/ directory")
	args = parser.parse_args(argv)
	done, left = migrate(args.root)
	print(f"migrated {len(done)} runs under {args.root}")
	for p in left:
		print(f"left {p}: an unfinished run (compare reads finished runs only)")
	return 0 if done else 1


if __name__ == "__main__":
	sys.exit(main())
