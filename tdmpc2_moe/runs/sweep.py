"""
`tdmpc2-moe train --tdmpc2 PATH -m key=a,b ...`: a Hydra multirun of upstream's training with the
patch applied in every job, on the launcher the config names, exactly as upstream's `train.py -m`:
upstream's default `submitit_local`, or `hydra/launcher=joblib` (local processes,
`hydra.launcher.n_jobs=N`), `hydra/launcher=ray` (Ray schedules the jobs by the resources they ask
for, `hydra.launcher.ray.remote.num_gpus=0.125` packs 8 per GPU; `hydra.launcher.ray.init.address=auto`
runs them on an existing Ray cluster), or `hydra/launcher=submitit_slurm` on a cluster. The launchers
are the `sweep` extra (`pip install .[sweep]`). Each job trains in a process of its own with its GPU,
EGL device and threads set before it starts (sweep_job.py, placement.py).

Before any job starts, every combination is composed and its settings checked: a bad setting, or
settings that cannot run (seed_steps under one episode, CUDA jobs on a machine without a GPU), is
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
from pathlib import Path

from . import placement, training
from .sweep_job import JOB_FILE, SAME_RUN, SWEEP_NODE, job, job_key
from ..settings.record import MOE_ONLY
from ..settings.config_keys import config_defaults
from ..settings.checks import first_line
from ..upstream import checkout

_NOT_VARIANT = ("task", "seed")
# Ray's init and remote options are free-form dicts in hydra-ray-launcher's config: a key not in them
# yet (num_gpus, num_cpus, resources) takes `++`; the sweep adds it for the user.
_RAY_OPTIONS = ("hydra.launcher.ray.init.", "hydra.launcher.ray.remote.")


class SweepError(ValueError):
	"""A sweep that cannot start; the message is one line naming the job or the key, `exit_code` the command's."""

	def __init__(self, message, exit_code=2):
		super().__init__(message)
		self.exit_code = exit_code


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


def same_runs(jobs, settings):
	"""
	Returns {job key: key of the earlier job that is the same run} (a job's key: its overrides, sorted,
	space-separated). Jobs that differ only in MoE settings (moe_*, gate_*) while use_moe is false train
	the same plain model: `use_moe=false,true moe_experts=4,6` is three runs, not four.
	"""
	first, same = {}, {}
	for overrides, job_settings in zip(jobs, settings):
		kept = tuple(sorted(o for o in overrides if job_settings.use_moe or o.partition("=")[0].lstrip("+") not in MOE_ONLY))
		key = job_key(overrides)
		if kept in first:
			same[key] = first[kept]
		else:
			first[kept] = key
	return same


def config_dir(pkg, directory, varying=(), same=None):
	"""
	Writes upstream's config.yaml plus the plugin's keys into `directory`, keeping its defaults (the
	launcher), with the node that tells each job the checkout, the `varying` keys and the jobs that
	are the `same` run as an earlier one (sweep_job.py).
	"""
	from omegaconf import OmegaConf
	base = OmegaConf.load(Path(pkg) / "config.yaml")
	sweep = {SWEEP_NODE: {"checkout": str(pkg), "varying": list(varying), "same_as": [[k, v] for k, v in (same or {}).items()]}}
	merged = OmegaConf.merge(base, OmegaConf.create(config_defaults()), OmegaConf.create(sweep))
	OmegaConf.save(merged, Path(directory) / "config.yaml")
	return directory


def with_ray_options(overrides):
	"""Returns `overrides` with `hydra.launcher.ray.init.X=V` / `.remote.X=V` written `++...` (add or override)."""
	return [f"++{o}" if o.startswith(_RAY_OPTIONS) else o for o in overrides]


def compose_hydra(overrides, path=None):
	"""Returns the composed `hydra` config node of a sweep with the `hydra...` entries of `overrides` (launcher, sweep dir)."""
	from hydra import compose, initialize_config_dir
	from hydra.core.global_hydra import GlobalHydra
	pkg = checkout.activate(path)
	with tempfile.TemporaryDirectory() as tmp:
		if GlobalHydra.instance().is_initialized():
			GlobalHydra.instance().clear()
		with initialize_config_dir(config_dir=config_dir(pkg, tmp), version_base=None):
			cfg = compose(config_name="config", overrides=[o for o in overrides if o.lstrip("+~").startswith(("hydra/", "hydra."))],
						  return_hydra_config=True)
	return cfg.hydra


def compose_launcher(overrides, path=None):
	"""Returns the composed `hydra.launcher` config of a sweep with `overrides` (how a SLURM launcher is checked without a cluster)."""
	return compose_hydra(overrides, path).launcher


def check(jobs, path):
	"""
	Composes every job's config and checks its settings and whether it can run; raises SweepError
	naming the job (exit code 2 for a bad setting, 1 for settings that cannot run, such as seed_steps
	under one episode). Returns the jobs' settings.
	"""
	from hydra.errors import HydraException
	out = []
	for overrides in jobs:
		try:
			_, settings, _ = training.prepare(overrides, path)
		except training.CannotRun as exc:
			raise SweepError(f"job {' '.join(overrides)}: {exc}", exit_code=1) from None
		except (ValueError, HydraException) as exc:
			raise SweepError(f"job {' '.join(overrides)}: {first_line(exc)}") from None
		out.append(settings)
	return out


def check_resources(launcher, settings, gpu_count=None):
	"""
	Raises SweepError (exit code 1) when the jobs ask for GPUs this node cannot give them: device=cuda
	with a launcher that runs jobs here and no GPU, or Ray's `remote.num_gpus` on a local Ray without
	GPUs (the jobs would wait forever). A Ray cluster (`init.address` set) is not checked here.
	"""
	name = placement.launcher_name(launcher)
	gpus = placement.device_count() if gpu_count is None else gpu_count
	if gpus:
		return
	if name == placement.RAY_LAUNCHER:
		remote, init = launcher.ray.get("remote", {}), launcher.ray.get("init", {})
		if (remote.get("num_gpus") or 0) > 0 and not init.get("address"):
			raise SweepError(f"hydra.launcher.ray.remote.num_gpus={remote.num_gpus} asks a GPU for every job, but this "
							 "machine has none and no Ray cluster is named (hydra.launcher.ray.init.address): the jobs "
							 "would wait forever", exit_code=1)
	elif name in placement.LOCAL_LAUNCHERS:
		cuda = [s for s in settings if s.device is None or s.device.type == "cuda"]
		if cuda:
			device = "null (upstream's cuda:0)" if cuda[0].device is None else str(cuda[0].device)
			raise SweepError(f"device={device} trains on CUDA, but this machine has no GPU for the jobs {name} "
							 "starts here: use device=cpu", exit_code=1)


def run(overrides, path=None):
	"""
	Runs the multirun of `overrides` and returns (exit code, summary lines): 0 when every job finished,
	1 when one failed (named). Raises SweepError before any job starts for a bad setting, settings that
	cannot run, or a missing launcher.
	"""
	import hydra
	from hydra.core.global_hydra import GlobalHydra
	pkg = checkout.activate(path)
	overrides = with_ray_options(overrides)
	jobs, hydra_keys = expand(overrides)
	settings = check(jobs, path)
	if not any(k.lstrip("+").startswith("hydra.sweep.dir=") for k in hydra_keys):
		stamp = datetime.datetime.now().strftime("%Y-%m-%d/%H-%M-%S")
		overrides = [*overrides, f"hydra.sweep.dir={Path.cwd() / 'multirun' / stamp}"]
	try:
		hydra_cfg = compose_hydra(overrides, path)
	except Exception as exc:  # noqa: BLE001 (Hydra's missing-plugin error and its kin)
		raise SweepError(f"cannot compose the launcher ({first_line(exc)}); the "
						 "launchers are the sweep extra: pip install .[sweep]") from None
	launcher, sweep_dir = hydra_cfg.launcher, Path(str(hydra_cfg.sweep.dir))
	check_resources(launcher, settings)
	os.environ.setdefault("MUJOCO_GL", "egl")
	name = placement.launcher_name(launcher)
	gpus = placement.job_gpus(name, settings[0].sweep_gpus)
	print(f"tdmpc2-moe sweep: {len(jobs)} jobs on {name}, in {sweep_dir}; "
		  f"{placement.describe(name, gpus, settings[0].sweep_threads)}", flush=True)
	with tempfile.TemporaryDirectory() as tmp:
		same = same_runs(jobs, settings)
		app = hydra.main(config_path=config_dir(pkg, tmp, varying_keys(jobs), same), config_name="config",
						 version_base=None)(job)
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
	same = [r for r in records if r["status"] == SAME_RUN]
	failed = [r for r in records if r["status"] not in ("finished", SAME_RUN)]
	missing = expected - len(records)
	if missing:
		lines.append(f"  {missing} job(s) left no record (killed, or the launcher lost them)")
	head = f"tdmpc2-moe sweep: {len(records) - len(failed) - len(same)} of {expected - len(same)} jobs finished"
	if same:
		head += f" ({len(same)} more combination{'s' if len(same) > 1 else ''} the same run as another, not run twice)"
	if failed:
		head += "; failed: " + "; ".join(" ".join(r["overrides"]) for r in failed)
	return (1 if failed or missing else 0), [head, *lines]
