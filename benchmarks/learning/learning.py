"""
Learning benchmark: real upstream TD-MPC2 online training through `tdmpc2-moe train` for several
variants (plain TD-MPC2, MoE top-2 of 4 on today's default heads, the fork preset, compute-matched
MoE: top-2 of 8 experts of half the width) with identical
settings and seeds, episode return against environment steps per variant and seed.

	python benchmarks/learning/learning.py run --tdmpc2 /root/tdmpc2 --tasks cartpole-balance --seeds 1 2
	python benchmarks/learning/learning.py report      # plot (PNG) and table (markdown) from the CSVs

`run` trains every (task, seed, variant) that has no complete result yet, up to `--jobs` at a time
(default 1; at most the core count), each as its own `python -m tdmpc2_moe train` process with one
torch thread, and prints a progress line per run. A run's result is `results/<task>/<variant>/seed<N>.csv`
in upstream's results format (`step,reward,seed`, one row per evaluation) next to `seed<N>.json`
(the exact command, wall time, resident memory); both are written only when the run has finished,
so a finished run is not redone and an interrupted one starts again from step 0 (upstream's trainer
cannot resume). An interrupted run leaves what it had evaluated in `seed<N>.partial.csv`.

A variant whose setting this tdmpc2_moe does not know yet (`moe_preset=fork` before it exists) is
skipped with a message and left without a result, so a later `run` trains it once the setting exists.
"""
import argparse
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
# The settings every variant shares: upstream's smallest model on the CPU with reduced planning, so
# that the plain agent learns cartpole-balance within a few thousand steps on a 2-core machine.
COMMON = ["model_size=1", "device=cpu", "compile=false", "seed_steps=1000", "batch_size=64",
		  "num_samples=128", "num_elites=16", "num_pi_trajs=8", "iterations=2", "eval_episodes=1",
		  "enable_wandb=false", "save_video=false", "save_agent=false"]
# Routing snapshots (work_dir/gates/step_<update>.npz) every this many updates in the MoE variants.
GATE_SNAPSHOT_EVERY = 250
# What differs between variants; the first key of each is the setting a variant needs to exist.
VARIANTS = {
	"plain": ["use_moe=false"],
	"moe": ["use_moe=true", "moe_experts=4", "moe_top_k=2", f"gate_snapshot_interval={GATE_SNAPSHOT_EVERY}"],
	"fork": ["moe_preset=fork", "use_moe=true", f"gate_snapshot_interval={GATE_SNAPSHOT_EVERY}"],
	# Compute-matched (docs/design.md 16): 8 experts of half the width (mlp_dim 384 at model_size=1), top-2.
	"matched": ["moe_expert_dim=192", "use_moe=true", "moe_experts=8", "moe_top_k=2",
				f"gate_snapshot_interval={GATE_SNAPSHOT_EVERY}"],
}
FIELDS = ("step", "reward", "seed")
RSS_EVERY_S = 10.0
# Lines of Hydra / the plugin's settings check that say a key is not known.
UNKNOWN_KEY_SIGNS = ("not in struct", "Could not override", "unknown setting", "Key '")


class Run:
	"""One training run: a task, a variant and a seed, with its result and work paths under `out`."""

	def __init__(self, out, task, variant, seed, steps, eval_freq, tdmpc2, settings=COMMON):
		self.task, self.variant, self.seed = task, variant, seed
		self.steps, self.eval_freq, self.tdmpc2, self.settings = steps, eval_freq, tdmpc2, list(settings)
		results = Path(out) / "results" / task / variant
		self.csv = results / f"seed{seed}.csv"
		self.meta = results / f"seed{seed}.json"
		self.partial = results / f"seed{seed}.partial.csv"
		self.work = Path(out) / "work" / task / variant / f"seed{seed}"
		self.proc = None
		self.started = None
		self.rss = []

	@property
	def name(self):
		return f"{self.task}/{self.variant}/seed{self.seed}"

	def overrides(self):
		"""Returns the key=value arguments of this run's `tdmpc2-moe train` command."""
		return [f"task={self.task}", f"seed={self.seed}", f"steps={self.steps}", f"eval_freq={self.eval_freq}",
				f"exp_name={self.variant}", *self.settings, *VARIANTS[self.variant]]

	def seed_steps(self):
		"""Returns the run's seed_steps setting (random-action steps before the first update)."""
		return int(next(o for o in self.settings if o.startswith("seed_steps=")).split("=")[1])

	def command(self):
		"""Returns the argv that trains this run."""
		return [sys.executable, "-m", "tdmpc2_moe", "train", "--tdmpc2", str(self.tdmpc2), *self.overrides()]

	@property
	def eval_csv(self):
		"""Upstream's own eval log: its Logger writes work_dir/eval.csv, work_dir = cwd/logs/task/seed/exp_name."""
		return self.work / "logs" / self.task / str(self.seed) / self.variant / "eval.csv"

	def complete(self):
		"""Returns whether this run has a finished result for the same command (so it is not redone)."""
		if not (self.csv.is_file() and self.meta.is_file()):
			return False
		try:
			meta = json.loads(self.meta.read_text())
			rows = read_results(self.csv)
		except (ValueError, OSError):
			return False
		return meta.get("overrides") == self.overrides() and bool(rows) and rows[-1][0] == self.steps

	def start(self, env):
		"""Starts training from step 0 in a fresh work directory."""
		if self.work.exists():
			shutil.rmtree(self.work)
		self.work.mkdir(parents=True)
		self.rss = []
		log = open(self.work / "train.log", "w")
		self.proc = subprocess.Popen(self.command(), cwd=self.work, env=env, stdout=log, stderr=subprocess.STDOUT,
									 start_new_session=True)
		log.close()
		self.started = time.time()

	def evaluations(self):
		"""Returns [(step, reward)] that upstream has logged so far."""
		if not self.eval_csv.is_file():
			return []
		with open(self.eval_csv) as f:
			return [(int(float(r["step"])), float(r["episode_reward"])) for r in csv.DictReader(f)]

	def sample_rss(self):
		"""Records (seconds, last evaluated step, resident MB) of the training process."""
		if self.rss and time.time() - self.started - self.rss[-1][0] < RSS_EVERY_S:
			return
		try:
			mb = psutil.Process(self.proc.pid).memory_info().rss / 2 ** 20
		except psutil.Error:
			return
		if mb == 0:
			return
		evals = self.evaluations()
		self.rss.append((round(time.time() - self.started, 1), evals[-1][0] if evals else -1, round(mb, 1)))

	def progress(self):
		"""Returns one line saying where this run is."""
		evals = self.evaluations()
		last = f"eval {evals[-1][1]:.1f} at step {evals[-1][0]}" if evals else "no eval yet"
		rss = f", rss {self.rss[-1][2]:.0f} MB" if self.rss else ""
		return f"[{self.name}] {last} (of {self.steps} steps), {time.time() - self.started:.0f} s{rss}"

	def log_tail(self, lines=8):
		"""Returns the last lines of this run's train.log."""
		try:
			return "\n".join((self.work / "train.log").read_text(errors="replace").splitlines()[-lines:])
		except OSError:
			return ""

	def unknown_setting(self):
		"""Returns the log line saying this variant's setting is unknown, or None."""
		key = VARIANTS[self.variant][0].split("=")[0]
		for line in self.log_tail(40).splitlines():
			if key in line and any(sign in line for sign in UNKNOWN_KEY_SIGNS):
				return line.strip()
		return None

	def finish(self):
		"""Writes the result files of a run that exited 0; returns an error message or None."""
		evals = self.evaluations()
		if not evals or evals[-1][0] != self.steps:
			return f"exited 0 but its eval log ends at {evals[-1][0] if evals else 'no evaluation'}, not step {self.steps}"
		write_results(self.csv, evals, self.seed)
		self.meta.write_text(json.dumps(dict(
			command=" ".join(self.command()), overrides=self.overrides(), wall_s=round(time.time() - self.started, 1),
			rss=self.rss, rss_growth_mb=rss_growth(self.rss, self.eval_freq, self.seed_steps())), indent=1) + "\n")
		self.partial.unlink(missing_ok=True)
		self.save_routing()
		return None

	@property
	def routing_png(self):
		"""The committed plot of this run's routing over training (MoE variants)."""
		return self.csv.with_name(f"seed{self.seed}.routing.png")

	def save_routing(self):
		"""
		Draws the run's gate snapshots (upstream work_dir/gates, git-ignored and a few MB) as usage
		share and entropy per expert against the update into `seed<N>.routing.png` and `.routing.md`
		next to the CSV; returns the PNG path, or None for a run without snapshots (plain).
		"""
		gates = self.eval_csv.parent / "gates"
		if not gates.is_dir():
			return None
		from tdmpc2_moe.gate_snapshots import write_training_report
		_, png = write_training_report(str(gates), str(self.csv.parent), self.routing_png.stem, echo=None)
		return png

	def stop(self):
		"""Stops a running process (its whole session) and keeps what it had evaluated as a partial CSV."""
		if self.proc is not None and self.proc.poll() is None:
			os.killpg(self.proc.pid, signal.SIGTERM)
			try:
				self.proc.wait(30)
			except subprocess.TimeoutExpired:
				os.killpg(self.proc.pid, signal.SIGKILL)
				self.proc.wait()
		evals = self.evaluations()
		if evals:
			write_results(self.partial, evals, self.seed)
		return evals[-1][0] if evals else None


def rss_growth(samples, eval_freq, seed_steps):
	"""
	Returns the resident-memory growth in MB from the first sample taken after the first evaluation
	past the seed pretraining (replay buffer, optimiser state and model already allocated) to the
	last sample, or None when there are too few samples.
	"""
	# A sample of 0 MB was read while the process was exiting.
	after = [s for s in samples if s[1] >= seed_steps + eval_freq and s[2] > 0]
	if len(after) < 2:
		return None
	return round(after[-1][2] - after[0][2], 1)


def write_results(path, evals, seed):
	"""Writes [(step, reward)] as upstream's results format, `step,reward,seed`, atomically."""
	if not evals:
		raise ValueError("evals must hold at least one (step, reward)")
	path = Path(path)
	path.parent.mkdir(parents=True, exist_ok=True)
	tmp = path.with_suffix(".tmp")
	with open(tmp, "w", newline="") as f:
		writer = csv.writer(f)
		writer.writerow(FIELDS)
		for step, reward in evals:
			writer.writerow((int(step), f"{float(reward):.1f}", int(seed)))
	os.replace(tmp, path)


def read_results(path):
	"""Returns [(step, reward, seed)] of a results CSV; ValueError when its header is not step,reward,seed."""
	with open(path) as f:
		reader = csv.reader(f)
		header = next(reader, None)
		if tuple(header or ()) != FIELDS:
			raise ValueError(f"{path}: header must be {','.join(FIELDS)}, got {header}")
		return [(int(r[0]), float(r[1]), int(r[2])) for r in reader]


def plan(out, tasks, seeds, variants, steps, eval_freq, tdmpc2, settings=COMMON):
	"""
	Returns the runs in launch order: per seed, per task, every variant, so that the variants of a
	task finish side by side and a budget cut short still leaves every task with its first seed.
	"""
	for name in variants:
		if name not in VARIANTS:
			raise ValueError(f"variants: unknown variant {name!r}; variants are {list(VARIANTS)}")
	return [Run(out, task, variant, seed, steps, eval_freq, tdmpc2, settings)
			for seed in seeds for task in tasks for variant in variants]


def run_all(runs, jobs, poll_s=30.0, echo=print):
	"""
	Trains the runs that are not complete, up to `jobs` at a time, printing a progress line per run
	every `poll_s` seconds. Returns {run name: "done" | "skipped: ..." | "failed: ..." | "complete" |
	"stopped at step N"}. SIGINT/SIGTERM stop the running processes and keep their partial CSVs.
	"""
	env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
	status, pending, active = {}, [], []
	for r in runs:
		if r.complete():
			status[r.name] = "complete"
			echo(f"[{r.name}] complete, not redone ({r.csv})")
		else:
			pending.append(r)
	skipped_variants = {}

	def stop_all(signum, frame):
		raise KeyboardInterrupt

	previous = signal.signal(signal.SIGTERM, stop_all)
	try:
		last_print = 0.0
		while pending or active:
			while pending and len(active) < jobs:
				r = pending.pop(0)
				if r.variant in skipped_variants:
					status[r.name] = skipped_variants[r.variant]
					continue
				r.start(env)
				active.append(r)
				echo(f"[{r.name}] started: {' '.join(r.command())}")
			time.sleep(min(poll_s, 2.0))
			for r in active:
				r.sample_rss()
			if time.time() - last_print >= poll_s:
				last_print = time.time()
				for r in active:
					echo(r.progress())
			for r in list(active):
				code = r.proc.poll()
				if code is None:
					continue
				active.remove(r)
				if code == 0:
					error = r.finish()
					status[r.name] = f"failed: {error}" if error else "done"
				elif (line := r.unknown_setting()) is not None:
					key = VARIANTS[r.variant][0]
					status[r.name] = skipped_variants[r.variant] = (
						f"skipped: this tdmpc2_moe does not know {key} yet ({line}); run again once it exists")
				else:
					status[r.name] = f"failed: exit {code}; log tail:\n{r.log_tail()}"
				echo(f"[{r.name}] {status[r.name]} ({time.time() - r.started:.0f} s)")
	except KeyboardInterrupt:
		for r in active:
			step = r.stop()
			status[r.name] = f"stopped at step {step} (partial CSV {r.partial})" if step is not None else "stopped"
			echo(f"[{r.name}] {status[r.name]}")
	finally:
		signal.signal(signal.SIGTERM, previous)
	return status


def measure(task, variant, tdmpc2, updates=30, acts=100, warmup=5, seed=1):
	"""
	A short dedicated timing of one variant with the learning runs' settings, in this process on one
	torch thread: returns {ms_per_update, ms_per_act} in process CPU time and the same as wall time
	(wall_ms_per_update, wall_ms_per_act) (medians of `updates` `agent.update(buffer)` calls
	on a buffer of two random-action episodes of `task`, and of `acts` `agent.act(obs)` planning calls
	on real observations), or {skipped: reason} when this tdmpc2_moe does not know the variant's setting.
	"""
	import statistics
	import torch
	from hydra.errors import HydraException
	from tdmpc2_moe import patching, upstream
	os.environ.setdefault("MUJOCO_GL", "egl")
	threads = torch.get_num_threads()
	torch.set_num_threads(1)
	patching.patch()
	try:
		try:
			cfg = upstream.load_cfg([f"task={task}", f"seed={seed}", "steps=100000", *COMMON, *VARIANTS[variant]], tdmpc2)
		except HydraException as exc:
			return dict(skipped=f"this tdmpc2_moe does not know {VARIANTS[variant][0]} yet ({str(exc).splitlines()[0]})")
		from envs import make_env
		from common.buffer import Buffer
		from tensordict import TensorDict
		from tdmpc2 import TDMPC2
		env = make_env(cfg)
		torch.manual_seed(seed)
		agent, buffer = TDMPC2(cfg), Buffer(cfg)
		obs_seen = []
		for _ in range(2):
			obs = env.reset()
			rows = [TensorDict(obs=obs[None], action=torch.full((1, cfg.action_dim), float("nan")),
							   reward=torch.full((1,), float("nan")), terminated=torch.full((1,), float("nan")), batch_size=(1,))]
			for _ in range(cfg.episode_length):
				action = torch.rand(cfg.action_dim) * 2 - 1
				obs, reward, _, info = env.step(action)
				obs_seen.append(obs)
				rows.append(TensorDict(obs=obs[None], action=action[None], reward=reward[None],
									   terminated=info["terminated"][None], batch_size=(1,)))
			buffer.add(torch.cat(rows))

		def timed(name, fn, n):
			# Process CPU time besides wall time: on a shared machine wall time also counts other jobs' turns.
			wall, cpu = [], []
			for i in range(n + warmup):
				w, c = time.perf_counter(), time.process_time()
				fn(i)
				wall.append(time.perf_counter() - w)
				cpu.append(time.process_time() - c)
			return {f"ms_per_{name}": 1000 * statistics.median(cpu[warmup:]),
					f"wall_ms_per_{name}": 1000 * statistics.median(wall[warmup:])}
		return dict(**timed("update", lambda i: agent.update(buffer), updates),
					**timed("act", lambda i: agent.act(obs_seen[i], t0=i == 0), acts),
					updates=updates, acts=acts, backend=__import__("tdmpc2_moe").backend())
	finally:
		patching.unpatch()
		torch.set_num_threads(threads)


def main(argv=None):
	parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
	sub = parser.add_subparsers(dest="cmd", required=True)
	run = sub.add_parser("run", help="train every run that has no complete result")
	run.add_argument("--tdmpc2", default=os.environ.get("TDMPC2_ROOT"), help="TD-MPC2 checkout (default $TDMPC2_ROOT)")
	run.add_argument("--tasks", nargs="+", default=["cartpole-balance", "walker-stand"])
	run.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
	run.add_argument("--variants", nargs="+", default=list(VARIANTS))
	run.add_argument("--steps", type=int, default=4000)
	run.add_argument("--eval-freq", type=int, default=1000)
	run.add_argument("--jobs", type=int, default=1, help=f"runs at a time, 1 to the core count ({os.cpu_count()})")
	run.add_argument("--poll", type=float, default=60.0, help="seconds between progress lines")
	run.add_argument("--out", default=str(HERE))
	timing = sub.add_parser("measure", help="ms per update and per act of each variant, one at a time, in this process")
	timing.add_argument("--tdmpc2", default=os.environ.get("TDMPC2_ROOT"), help="TD-MPC2 checkout (default $TDMPC2_ROOT)")
	timing.add_argument("--tasks", nargs="+", default=["cartpole-balance", "walker-stand"])
	timing.add_argument("--variants", nargs="+", default=list(VARIANTS))
	timing.add_argument("--updates", type=int, default=30)
	timing.add_argument("--acts", type=int, default=100)
	timing.add_argument("--out", default=str(HERE))
	report = sub.add_parser("report", help="plot and table from the result CSVs")
	report.add_argument("--out", default=str(HERE))
	report.add_argument("--at", nargs="+", type=int, default=None, help="steps of the return table")
	args = parser.parse_args(argv)
	if args.cmd == "run":
		if not args.tdmpc2:
			parser.error("--tdmpc2 (or $TDMPC2_ROOT) must name a TD-MPC2 checkout")
		if not 1 <= args.jobs <= (os.cpu_count() or 1):
			parser.error(f"--jobs must be between 1 and the core count {os.cpu_count()}, got {args.jobs}")
		if args.steps <= 0 or args.eval_freq <= 0 or args.steps % args.eval_freq:
			parser.error("--steps and --eval-freq must be positive and --steps a multiple of --eval-freq")
		runs = plan(args.out, args.tasks, args.seeds, args.variants, args.steps, args.eval_freq,
					Path(args.tdmpc2).resolve())
		status = run_all(runs, args.jobs, args.poll)
		print("\nsummary:")
		for name, state in status.items():
			print(f"  {name}: {state.splitlines()[0]}")
		return 1 if any(s.startswith(("failed", "stopped")) for s in status.values()) else 0
	if args.cmd == "measure":
		if not args.tdmpc2:
			parser.error("--tdmpc2 (or $TDMPC2_ROOT) must name a TD-MPC2 checkout")
		for task in args.tasks:
			path = Path(args.out) / "results" / task / "measure.json"
			found = {name: measure(task, name, Path(args.tdmpc2).resolve(), args.updates, args.acts)
					 for name in args.variants}
			path.parent.mkdir(parents=True, exist_ok=True)
			path.write_text(json.dumps(found, indent=1) + "\n")
			for name, m in found.items():
				print(f"{task} {name}: " + (m["skipped"] if "skipped" in m else
						f"{m['ms_per_update']:.1f} ms/update, {m['ms_per_act']:.1f} ms/act CPU time "
						f"({m['wall_ms_per_update']:.1f}, {m['wall_ms_per_act']:.1f} wall; backend {m['backend']})"))
		return 0
	from report import report as make_report
	print(make_report(Path(args.out), args.at))
	return 0


if __name__ == "__main__":
	sys.exit(main())
