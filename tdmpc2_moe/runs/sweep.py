"""
`tdmpc2-moe train --tdmpc2 PATH -m key=a,b ...`: a Hydra multirun of upstream's training with the
patch applied in every job, on the launcher the config names, exactly as upstream's `train.py -m`:
upstream's default `submitit_local`, or `hydra/launcher=joblib` (local processes,
`hydra.launcher.n_jobs=N`), or `hydra/launcher=submitit_slurm` on a cluster. The launchers are the
`sweep` extra (`pip install .[sweep]`).

Before any job starts, every combination is composed and its settings checked: a bad setting is
reported naming the job's overrides and nothing runs. A job that fails records why and the others go
on; the summary at the end names it. Each job prints one line when it finishes (its last evaluation
return and its minutes) and writes `tdmpc2_moe_job.json` in its Hydra job directory.

Runs of a sweep that vary more than `task` and `seed` would share upstream's work_dir
(`logs/<task>/<seed>/<exp_name>`), so unless the command sets `exp_name`, each job's exp_name gets the
varied keys appended (`default-moe_experts=8,use_moe=true`): the same command always gives a job the
same work_dir, which is what `resume=true` (with `checkpoint_interval`) continues from.
"""
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from . import training

from ..upstream import checkout
from ..settings.config_keys import config_defaults

JOB_FILE = "tdmpc2_moe_job.json"
VARYING_ENV = "TDMPC2_MOE_SWEEP_VARYING"
_NOT_VARIANT = ("task", "seed")


class SweepError(ValueError):
	"""A sweep that cannot start; the message is one line naming the job or the key."""


def expand(overrides):
	"""Returns (job override lists, hydra overrides): the combinations Hydra's basic sweeper will run, and the `hydra...` overrides."""
	from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
	from hydra.core.override_parser.overrides_parser import OverridesParser
	job_keys = [o for o in overrides if not o.lstrip("+~").startswith("hydra")]
	hydra_keys = [o for o in overrides if o.lstrip("+~").startswith("hydra")]
	parsed = OverridesParser.create().parse_overrides(job_keys)
	jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
	return jobs, hydra_keys


def varying_keys(jobs):
	"""Returns the keys (other than task and seed) whose value differs between `jobs`, sorted."""
	values = {}
	for job in jobs:
		for override in job:
			key, _, value = override.partition("=")
			values.setdefault(key.lstrip("+"), set()).add(value)
	return sorted(k for k, v in values.items() if len(v) > 1 and k not in _NOT_VARIANT)


def config_dir(pkg, directory):
	"""Writes upstream's config.yaml plus the plugin's keys into `directory`, keeping its defaults (the launcher)."""
	from omegaconf import OmegaConf
	base = OmegaConf.load(Path(pkg) / "config.yaml")
	merged = OmegaConf.merge(base, OmegaConf.create(config_defaults()))
	OmegaConf.save(merged, Path(directory) / "config.yaml")
	return directory


def compose_hydra(overrides, path=None):
	"""Returns the composed `hydra` config node of a sweep with the `hydra...` entries of `overrides` (launcher, sweep dir)."""
	from hydra import compose, initialize_config_dir
	from hydra.core.global_hydra import GlobalHydra
	pkg = checkout.activate(path)
	with tempfile.TemporaryDirectory() as tmp:
		if GlobalHydra.instance().is_initialized():
			GlobalHydra.instance().clear()
		with initialize_config_dir(config_dir=config_dir(pkg, tmp), version_base=None):
			cfg = compose(config_name="config", overrides=[o for o in overrides if o.startswith(("hydra/", "hydra."))],
						  return_hydra_config=True)
	return cfg.hydra


def compose_launcher(overrides, path=None):
	"""Returns the composed `hydra.launcher` config of a sweep with `overrides` (how a SLURM launcher is checked without a cluster)."""
	return compose_hydra(overrides, path).launcher


def _exp_name(cfg, job_overrides, varying):
	keys = {o.partition("=")[0].lstrip("+") for o in job_overrides}
	if "exp_name" in keys or not varying:
		return cfg.exp_name
	parts = [o.lstrip("+") for o in sorted(job_overrides) if o.partition("=")[0].lstrip("+") in varying]
	return f"{cfg.exp_name}-{','.join(parts)}"


def _last_eval(work_dir):
	path = Path(work_dir) / "eval.csv"
	if not path.is_file():
		return None
	import csv
	with open(path) as f:
		rows = list(csv.DictReader(f))
	return (float(rows[-1]["step"]), float(rows[-1]["episode_reward"])) if rows else None


def job(cfg):
	"""The task function of every sweep job (runs in the job's process): trains with the patch, records how it went."""
	from hydra.core.hydra_config import HydraConfig
	from omegaconf import OmegaConf, open_dict
	hc = HydraConfig.get()
	overrides = list(hc.overrides.task)
	record = dict(num=hc.job.num, overrides=overrides, status="failed", error=None)
	start = time.time()
	try:
		checkout.activate(os.environ.get(checkout.ENV_VAR))
		with open_dict(cfg):
			cfg.exp_name = _exp_name(cfg, overrides, [k for k in os.environ.get(VARYING_ENV, "").split(",") if k])
		record["work_dir"] = str(Path(hc.runtime.cwd) / "logs" / str(cfg.task) / str(cfg.seed) / str(cfg.exp_name))
		settings = training.MoESettings.resolve(cfg)
		seed_steps = None if OmegaConf.is_missing(cfg, "seed_steps") else cfg.seed_steps
		training.run(cfg, settings, seed_steps)
		record["status"] = "finished"
	except Exception as exc:  # noqa: BLE001 (a failing job is reported; the others go on)
		record["error"] = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"
	record["minutes"] = (time.time() - start) / 60
	last = _last_eval(record.get("work_dir", "."))
	record["last_eval"] = None if last is None else dict(step=last[0], reward=last[1])
	Path(hc.runtime.output_dir, JOB_FILE).write_text(json.dumps(record, indent=1) + "\n")
	ret = "" if last is None else f", return {last[1]:.1f} at step {last[0]:.0f}"
	print(f"tdmpc2-moe sweep: job {record['num']} ({' '.join(overrides)}) {record['status']}{ret}, "
		  f"{record['minutes']:.1f} min" + (f": {record['error']}" if record["error"] else ""), file=sys.stderr, flush=True)
	return record


def check(jobs, path):
	"""Composes every job's config and checks its settings; raises SweepError naming the job."""
	from hydra.errors import HydraException
	for overrides in jobs:
		try:
			training.prepare(overrides, path)
		except (ValueError, HydraException) as exc:
			raise SweepError(f"job {' '.join(overrides)}: {(str(exc).strip().splitlines() or [''])[0]}") from None


def run(overrides, path=None):
	"""
	Runs the multirun of `overrides` and returns (exit code, summary lines): 0 when every job finished,
	1 when one failed (named). Raises SweepError before any job starts for a bad setting or a missing launcher.
	"""
	import hydra
	from hydra.core.global_hydra import GlobalHydra
	pkg = checkout.activate(path)
	jobs, hydra_keys = expand(overrides)
	check(jobs, path)
	if not any(k.lstrip("+").startswith("hydra.sweep.dir=") for k in hydra_keys):
		stamp = datetime.datetime.now().strftime("%Y-%m-%d/%H-%M-%S")
		overrides = [*overrides, f"hydra.sweep.dir={Path.cwd() / 'multirun' / stamp}"]
	try:
		hydra_cfg = compose_hydra(overrides, path)
	except Exception as exc:  # noqa: BLE001 (Hydra's missing-plugin error and its kin)
		raise SweepError(f"cannot compose the launcher ({(str(exc).strip().splitlines() or [''])[0]}); the "
						 "launchers are the sweep extra: pip install .[sweep]") from None
	launcher, sweep_dir = hydra_cfg.launcher, Path(str(hydra_cfg.sweep.dir))
	os.environ[checkout.ENV_VAR] = str(pkg)
	os.environ[VARYING_ENV] = ",".join(varying_keys(jobs))
	os.environ.setdefault("MUJOCO_GL", "egl")
	print(f"tdmpc2-moe sweep: {len(jobs)} jobs on {launcher._target_.rsplit('.', 1)[-1]}, in {sweep_dir}", flush=True)
	with tempfile.TemporaryDirectory() as tmp:
		app = hydra.main(config_path=config_dir(pkg, tmp), config_name="config", version_base=None)(job)
		argv = sys.argv
		sys.argv = ["tdmpc2-moe train", "-m", *overrides]
		if GlobalHydra.instance().is_initialized():
			GlobalHydra.instance().clear()
		try:
			app()
		except SystemExit as exc:
			if exc.code not in (0, None):
				raise SweepError(f"Hydra stopped the sweep (exit code {exc.code}); its message is above") from None
		finally:
			sys.argv = argv
	return summarize(sweep_dir, len(jobs))


def summarize(sweep_dir, expected):
	"""Returns (exit code, lines): one line per job from its JOB_FILE, and jobs that left none."""
	records = [json.loads(p.read_text()) for p in sorted(Path(sweep_dir).glob(f"*/{JOB_FILE}"))]
	lines = []
	for r in sorted(records, key=lambda r: r["num"]):
		ret = "" if not r.get("last_eval") else f", return {r['last_eval']['reward']:.1f} at step {r['last_eval']['step']:.0f}"
		lines.append(f"  job {r['num']} {r['status']}: {' '.join(r['overrides'])}{ret}, {r['minutes']:.1f} min"
					 + (f" -- {r['error']}" if r.get("error") else ""))
	failed = [r for r in records if r["status"] != "finished"]
	missing = expected - len(records)
	if missing:
		lines.append(f"  {missing} job(s) left no record (killed, or the launcher lost them)")
	head = f"tdmpc2-moe sweep: {len(records) - len(failed)} of {expected} jobs finished"
	if failed:
		head += "; failed: " + "; ".join(" ".join(r["overrides"]) for r in failed)
	return (1 if failed or missing else 0), [head, *lines]
