"""
One job of a sweep (`tdmpc2-moe train -m`, sweep.py), as Hydra's launcher runs it: in a joblib or Ray
worker, a SLURM job, or the sweep's own process. The job trains in a fresh process of its own, the
same `tdmpc2-moe train` a user would type with the job's overrides, so that what must be set before a
process starts is (its GPU, EGL device and threads: placement.py), and so that nothing of one job
(a worker runs several, one after the other) reaches the next. It records how it went in
`tdmpc2_moe_job.json` in its Hydra job directory and prints one line when it ends.
"""
import collections
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from . import placement
from ..settings.record import MOE_ONLY, MoESettings
from ..settings.checks import first_line

JOB_FILE = "tdmpc2_moe_job.json"
# The config node through which the sweep tells its jobs what they cannot read from their own config:
# the TD-MPC2 checkout and the keys that vary between jobs (environment variables would not reach the
# workers of a Ray cluster; the job's config does, with every launcher).
SWEEP_NODE = "tdmpc2_moe_sweep"
# The status of a job whose combination is the same run as an earlier job's (sweep.same_runs): not run twice.
SAME_RUN = "same run"


def job_key(overrides):
	"""Returns the key of a job by its overrides: sorted, space-separated."""
	return " ".join(sorted(overrides))


def exp_name(cfg, job_overrides, varying):
	"""Returns the job's exp_name: the command's, with the varied keys appended unless the command sets exp_name."""
	keys = {o.partition("=")[0].lstrip("+") for o in job_overrides}
	if "exp_name" in keys or not varying:
		return cfg.exp_name
	parts = [o.lstrip("+") for o in sorted(job_overrides) if o.partition("=")[0].lstrip("+") in varying]
	return f"{cfg.exp_name}-{','.join(parts)}"


def quoted(value):
	"""
	Returns `value` as a quoted Hydra override value (an exp_name such as `default-use_moe=true` holds
	`=`). In Hydra's quoted strings a quote is escaped with a backslash, and only backslashes right
	before a quote (or the closing one) are escaped themselves.
	"""
	body = re.sub(r"(\\*)(')", lambda m: m.group(1) * 2 + "\\'", value)
	body = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, body)
	return f"'{body}'"


def _last_eval(work_dir):
	path = Path(work_dir) / "eval.csv"
	if not path.is_file():
		return None
	import csv
	with open(path) as f:
		rows = list(csv.DictReader(f))
	return (float(rows[-1]["step"]), float(rows[-1]["episode_reward"])) if rows else None


def _ray_resources():
	"""Returns the resources Ray assigned to this job ({"CPU": 1.0, "GPU": 0.125, ...}), or None outside a Ray worker."""
	ray = sys.modules.get("ray")
	if ray is None or not ray.is_initialized():
		return None
	return {k: float(v) for k, v in ray.get_runtime_context().get_assigned_resources().items()}


def train_in_own_process(checkout, overrides, env, cwd):
	"""
	Runs `tdmpc2-moe train --tdmpc2 checkout overrides...` in a new process with `env` added to this
	one's environment; its output goes where this process's goes. Returns (exit code, the last line it
	wrote to stderr: its error, when it failed).
	"""
	cmd = [sys.executable, "-m", "tdmpc2_moe", "train", "--tdmpc2", str(checkout), *overrides]
	proc = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, **env}, stderr=subprocess.PIPE, text=True, bufsize=1)
	tail = collections.deque(maxlen=20)

	def forward():
		for line in proc.stderr:
			sys.stderr.write(line)
			sys.stderr.flush()
			if line.strip():
				tail.append(line.strip())
	pump = threading.Thread(target=forward, daemon=True)
	pump.start()
	code = proc.wait()
	pump.join()
	return code, (tail[-1] if tail else "")


def job(cfg):
	"""The task function of every sweep job: trains in a process of its own and records how it went."""
	from hydra.core.hydra_config import HydraConfig
	hc = HydraConfig.get()
	overrides = list(hc.overrides.task)
	record = dict(num=hc.job.num, overrides=overrides, status="failed", error=None, started=time.time())
	try:
		sweep = cfg[SWEEP_NODE]
		settings = MoESettings.resolve(cfg)
		# A plain run's name leaves out MoE keys: they change nothing in it.
		varying = [k for k in sweep.varying if settings.use_moe or k not in MOE_ONLY]
		name = exp_name(cfg, overrides, varying)
		command = overrides if name == cfg.exp_name else [*overrides, f"exp_name={quoted(name)}"]
		record["work_dir"] = str(Path(hc.runtime.cwd) / "logs" / str(cfg.task) / str(cfg.seed) / name)
		same_as = {key: first for key, first in sweep.same_as}
		if job_key(overrides) in same_as:
			record.update(status=SAME_RUN, same_as=same_as[job_key(overrides)])
			return _finish(record, hc)
		launcher = placement.launcher_name(hc.launcher)
		gpus = placement.job_gpus(launcher, settings.sweep_gpus)
		record["environment"] = placement.job_environment(hc.job.num, launcher, gpus, settings.sweep_threads)
		record["ray_resources"] = _ray_resources()
		code, last_line = train_in_own_process(sweep.checkout, command, record["environment"], hc.runtime.cwd)
		if code == 0:
			record["status"] = "finished"
		else:
			record["error"] = f"exit code {code}: {last_line[:200]}"
	except Exception as exc:  # noqa: BLE001 (a failing job is reported; the others go on)
		record["error"] = f"{type(exc).__name__}: {first_line(exc, 200)}"
	return _finish(record, hc)


def _finish(record, hc):
	"""Writes the job's record into its Hydra job directory, prints its line and returns it."""
	overrides = record["overrides"]
	record["ended"] = time.time()
	record["minutes"] = (record["ended"] - record["started"]) / 60
	last = _last_eval(record.get("work_dir", "."))
	record["last_eval"] = None if last is None else dict(step=last[0], reward=last[1])
	Path(hc.runtime.output_dir, JOB_FILE).write_text(json.dumps(record, indent=1) + "\n")
	ret = "" if last is None else f", return {last[1]:.1f} at step {last[0]:.0f}"
	status = f"the same run as {record['same_as']}" if record["status"] == SAME_RUN else record["status"]
	print(f"tdmpc2-moe sweep: job {record['num']} ({' '.join(overrides)}) {status}{ret}, "
		  f"{record['minutes']:.1f} min" + (f": {record['error']}" if record["error"] else ""), file=sys.stderr, flush=True)
	return record
