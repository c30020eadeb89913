"""
Where do two runs of the same training command part? A bisection tool for seeded reproducibility
(issue 29, docs/long_runs.md "Reproducible runs").

`run` trains exactly as `tdmpc2-moe train` does (tdmpc2_moe.runs.training: upstream's train.py with the
patch) and records, in the order they happen, a digest (SHA-256 of the bytes) of what each stage
produced: every environment reset and step, every seed-phase random action, every episode added to
the buffer, every sampled batch, the torch and NumPy RNG states and the losses of every update, the
gradients each optimiser step sees and the parameters after it, every planned action. `compare`
walks two traces side by side and names the first event that differs (and, per kind of event, the
first index where it does), so the stage where two runs part is read off, not guessed. `pair`
starts two fresh processes side by side (each in its own directory, same environment) and compares.

    python scripts/repro_trace.py pair --tdmpc2 ~/tdmpc2 --threads 1 --out /tmp/pair task=cartpole-balance ...
    python scripts/repro_trace.py compare A/trace.json B/trace.json

The hooks only read tensors (copies to bytes); they draw no random numbers and change no state.
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path


def _digest(value):
	"""Returns a short SHA-256 of `value`: tensors by dtype, shape and bytes; TensorDicts, dicts and sequences item by item."""
	import numpy as np
	import torch
	h = hashlib.sha256()

	def feed(v):
		if isinstance(v, torch.Tensor):
			t = v.detach().cpu().contiguous()
			h.update(f"{t.dtype}{tuple(t.shape)}".encode())
			h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
		elif isinstance(v, np.ndarray):
			h.update(f"{v.dtype}{v.shape}".encode())
			h.update(np.ascontiguousarray(v).tobytes())
		elif hasattr(v, "items"):
			for k, x in sorted(v.items(), key=lambda kv: str(kv[0])):
				h.update(str(k).encode())
				feed(x)
		elif isinstance(v, (list, tuple)):
			for x in v:
				feed(x)
		else:
			h.update(repr(v).encode())
	feed(value)
	return h.hexdigest()[:16]


class Trace:
	"""The events of one run, in order: (kind, digest)."""

	def __init__(self):
		self.events = []

	def add(self, kind, value):
		self.events.append((kind, _digest(value)))

	def save(self, path):
		Path(path).write_text(json.dumps({"events": self.events}) + "\n")


def _wrap(owner, name, make):
	setattr(owner, name, make(getattr(owner, name)))


def install(trace):
	"""Wraps upstream's environment, buffer and agent (as imported from the active checkout) so that `trace` sees every stage."""
	import numpy as np
	import torch
	from common.buffer import Buffer
	from envs.wrappers.tensor import TensorWrapper
	from tdmpc2 import TDMPC2

	def reset(original):
		def wrapped(self, *args, **kwargs):
			obs = original(self, *args, **kwargs)
			trace.add("env.reset", obs)
			return obs
		return wrapped

	def step(original):
		def wrapped(self, action):
			out = original(self, action)
			trace.add("env.step", out[:3])
			return out
		return wrapped

	def rand_act(original):
		def wrapped(self):
			action = original(self)
			trace.add("env.rand_act", action)
			return action
		return wrapped

	def add(original):
		def wrapped(self, td):
			out = original(self, td)
			trace.add("buffer.add", td)
			return out
		return wrapped

	def sample(original):
		def wrapped(self):
			batch = original(self)
			trace.add("buffer.sample", batch)
			return batch
		return wrapped

	def agent_init(original):
		def wrapped(self, cfg):
			original(self, cfg)
			trace.add("agent.init", self.model.state_dict())
			for label in ("optim", "pi_optim"):
				optim = getattr(self, label)
				params = [p for g in optim.param_groups for p in g["params"]]
				optim.register_step_pre_hook(
					lambda o, a, k, label=label, params=params: trace.add(f"{label}.grads", [p.grad for p in params]))
				optim.register_step_post_hook(
					lambda o, a, k, label=label: trace.add(f"{label}.state", o.state_dict()))
		return wrapped

	def update(original):
		def wrapped(self, buffer):
			trace.add("update.rng", [torch.get_rng_state(), str(np.random.get_state())])
			info = original(self, buffer)
			trace.add("update.losses", {k: v for k, v in info.items()})
			trace.add("update.params", self.model.state_dict())
			return info
		return wrapped

	def act(original):
		def wrapped(self, obs, *args, **kwargs):
			action = original(self, obs, *args, **kwargs)
			trace.add("agent.act", action)
			return action
		return wrapped

	_wrap(TensorWrapper, "reset", reset)
	_wrap(TensorWrapper, "step", step)
	_wrap(TensorWrapper, "rand_act", rand_act)
	_wrap(Buffer, "add", add)
	_wrap(Buffer, "sample", sample)
	_wrap(TDMPC2, "__init__", agent_init)
	_wrap(TDMPC2, "update", update)
	_wrap(TDMPC2, "act", act)


def run(args):
	"""Trains once, as `tdmpc2-moe train`, and writes the trace to `args.out`."""
	from tdmpc2_moe import backend
	from tdmpc2_moe.runs import training
	cfg, settings, seed_steps = training.prepare(args.overrides, args.tdmpc2)
	trace = Trace()
	install(trace)
	training.run(cfg, settings, seed_steps)
	trace.save(args.out)
	print(f"repro_trace: {len(trace.events)} events, backend {backend()}, written to {args.out}")


def compare(path_a, path_b, out=sys.stdout):
	"""Prints where the traces at `path_a` and `path_b` part; returns 0 when they are equal, 1 otherwise."""
	a = json.loads(Path(path_a).read_text())["events"]
	b = json.loads(Path(path_b).read_text())["events"]
	first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
	if first is None and len(a) == len(b):
		print(f"equal: {len(a)} events", file=out)
		return 0
	if first is None:
		print(f"equal for {min(len(a), len(b))} events, then one trace ends ({len(a)} against {len(b)})", file=out)
		return 1
	counts = {}
	for kind, _ in a[:first]:
		counts[kind] = counts.get(kind, 0) + 1
	print(f"first difference: event {first} ({a[first][0]} #{counts.get(a[first][0], 0)}"
		  + ("" if a[first][0] == b[first][0] else f" against {b[first][0]}") + ")", file=out)
	print("before it, equal: " + ", ".join(f"{n} {k}" for k, n in counts.items()), file=out)
	kinds = sorted({k for k, _ in a} | {k for k, _ in b})
	for kind in kinds:
		xs = [d for k, d in a if k == kind]
		ys = [d for k, d in b if k == kind]
		differ = [i for i, (x, y) in enumerate(zip(xs, ys)) if x != y]
		where = f"first differs at #{differ[0]}, {len(differ)} of {min(len(xs), len(ys))} differ" if differ else "equal"
		print(f"  {kind:15s} {len(xs):5d} / {len(ys):5d}  {where}", file=out)
	return 1


def pair(args):
	"""
	Runs `run` twice in fresh processes with `args.threads` torch threads each, side by side (or one after
	the other with `--one-at-a-time`, so that runs of several threads do not share the cores), then compares.
	"""
	out = Path(args.out).resolve()
	env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads), PYTHONHASHSEED="0")
	procs = []
	for name in ("a", "b"):
		directory = out / name
		directory.mkdir(parents=True, exist_ok=True)
		cmd = [sys.executable, os.path.abspath(__file__), "run", "--out", str(directory / "trace.json")]
		if args.tdmpc2:
			cmd += ["--tdmpc2", args.tdmpc2]
		log = open(directory / "log.txt", "w")
		procs.append((subprocess.Popen(cmd + args.overrides, cwd=directory, env=env, stdout=log, stderr=subprocess.STDOUT), log))
		if args.one_at_a_time:
			procs[-1][0].wait()
	codes = [p.wait() for p, _ in procs]
	for _, log in procs:
		log.close()
	if any(codes):
		print(f"repro_trace: a run failed (exit codes {codes}); see {out}/a/log.txt and {out}/b/log.txt")
		return 2
	return compare(out / "a" / "trace.json", out / "b" / "trace.json")


def main(argv=None):
	parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
	sub = parser.add_subparsers(dest="command", required=True)
	for name in ("run", "pair"):
		p = sub.add_parser(name)
		p.add_argument("--tdmpc2", default=None, help="TD-MPC2 checkout (default $TDMPC2_ROOT)")
		p.add_argument("--out", required=True, help="trace file (run) or directory for both runs (pair)")
		if name == "pair":
			p.add_argument("--threads", type=int, default=1, help="torch threads of each run (OMP/MKL_NUM_THREADS)")
			p.add_argument("--one-at-a-time", action="store_true", help="start the second run when the first has ended")
		p.add_argument("overrides", nargs="*", metavar="key=value")
	p = sub.add_parser("compare")
	p.add_argument("a")
	p.add_argument("b")
	args = parser.parse_args(argv)
	if args.command == "run":
		run(args)
		return 0
	if args.command == "pair":
		return pair(args)
	return compare(args.a, args.b)


if __name__ == "__main__":
	sys.exit(main())
