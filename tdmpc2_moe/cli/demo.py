"""
`tdmpc2-moe demo`: trains the same small MoE regression model with the fork-style leaky block,
the leaky block with the fork's fix, and MoEBlock, one after the other, and prints step rate,
memory growth, history bytes held and host copies per step (plus a PNG of memory over steps).
No TD-MPC2 checkout needed.
"""
import argparse
import contextlib
import gc
import logging
import os
import time
import warnings

import psutil
import torch

from ..block.baselines import LeakyMoEBlock, plain_mlp
from ..block.moe import MoEBlock
from ..analysis.monitor import MemoryMonitor

IN_DIM, HIDDEN, OUT_DIM = 32, [64, 64], 16
# MoEBlock runs first: memory an earlier variant freed could otherwise absorb a later variant's growth.
VARIANTS = ("MoEBlock", "leaky + fix", "leaky")
_HOST_CALLS = ("cpu", "item", "tolist", "numpy")
_QUIET = logging.getLogger(__name__ + ".monitor")
_QUIET.addHandler(logging.NullHandler())
_QUIET.propagate = False


@contextlib.contextmanager
def count_host_calls():
	"""Counts calls of Tensor.cpu/.item/.tolist/.numpy (each a device-to-host copy on an accelerator); yields a list [count]."""
	counter = [0]
	saved = {name: torch.Tensor.__dict__.get(name) for name in _HOST_CALLS}

	def wrap(name):
		fn = getattr(torch.Tensor, name)

		def counted(self, *args, **kwargs):
			counter[0] += 1
			return fn(self, *args, **kwargs)
		return counted

	for name in _HOST_CALLS:
		setattr(torch.Tensor, name, wrap(name))
	try:
		yield counter
	finally:
		for name, fn in saved.items():
			if fn is None:
				delattr(torch.Tensor, name)
			else:
				setattr(torch.Tensor, name, fn)


def _block(variant, args):
	kwargs = dict(n_experts=args.experts, top_k=args.top_k, history_rows=args.history_rows)
	if variant == "MoEBlock":
		return MoEBlock(IN_DIM, HIDDEN, OUT_DIM, **kwargs)
	return LeakyMoEBlock(IN_DIM, HIDDEN, OUT_DIM, fix=variant == "leaky + fix", **kwargs)


def _history_bytes(block):
	if isinstance(block, LeakyMoEBlock):
		return block.history_bytes()
	history = block.history
	return history.ring.numel() * history.ring.element_size() + history.cursor.numel() * history.cursor.element_size()


def _train_step(block, opt, teacher, args):
	"""One step: `args.plan_forwards` no_grad forwards (as TD-MPC2's planning and TD targets) and one update.
	Returns (loss, host calls made by the block's forwards and backward)."""
	x = torch.randn(args.batch, IN_DIM)
	with count_host_calls() as calls:
		with torch.no_grad():
			for _ in range(args.plan_forwards):
				block(x)
		loss = (block(x) - teacher(x)).square().mean()
		if isinstance(block, LeakyMoEBlock):
			loss = loss + block.aux_loss
		opt.zero_grad(set_to_none=True)
		loss.backward()
	opt.step()
	if isinstance(block, LeakyMoEBlock):
		block.clear_after_update()
	return loss, calls[0]


def run_variant(variant, args, teacher):
	"""Trains one variant for `args.warmup` unmeasured then `args.steps` measured steps; returns a dict of measurements."""
	torch.manual_seed(args.seed)
	block = _block(variant, args)
	opt = torch.optim.Adam(block.parameters(), lr=1e-3)
	for _ in range(args.warmup):
		_train_step(block, opt, teacher, args)
	process = psutil.Process(os.getpid())
	rss = lambda: process.memory_info().rss / 1024 ** 2
	monitor = MemoryMonitor(interval=args.sample_every, device="cpu", window=max(args.steps // args.sample_every, 2),
							threshold_mb_per_1k=args.threshold, min_samples=2, warmup=0, log=_QUIET,
							source=lambda: {"rss": rss()})
	gc.collect()
	start_rss, curve, host_calls = rss(), [(0, 0.0)], 0
	t0 = time.perf_counter()
	with warnings.catch_warnings():
		# The monitor's verdict is reported in the table instead.
		warnings.filterwarnings("ignore", message="memory keeps growing")
		for step in range(1, args.steps + 1):
			loss, calls = _train_step(block, opt, teacher, args)
			host_calls += calls
			monitor.step()
			if step % args.sample_every == 0:
				curve.append((step, rss() - start_rss))
	elapsed = time.perf_counter() - t0
	return {
		"variant": variant, "steps_per_s": args.steps / elapsed, "rss_mb_per_1k": monitor.slopes.get("rss", float("nan")),
		"rss_growth_mb": curve[-1][1], "history_bytes": _history_bytes(block),
		"host_copies_per_step": host_calls / args.steps, "leak_flagged": monitor.leak_suspected, "curve": curve,
		"loss": loss.item(),
	}


def format_table(rows):
	"""Returns the results as a fixed-width text table."""
	head = f"{'variant':<12} {'steps/s':>8} {'RSS MB/1k steps':>16} {'RSS growth MB':>14} {'history bytes':>14} " \
		f"{'host copies/step':>17} {'monitor':>8}"
	lines = [head, "-" * len(head)]
	for r in rows:
		lines.append(f"{r['variant']:<12} {r['steps_per_s']:>8.1f} {r['rss_mb_per_1k']:>16.2f} {r['rss_growth_mb']:>14.1f} "
					 f"{r['history_bytes']:>14,} {r['host_copies_per_step']:>17.1f} {'LEAK' if r['leak_flagged'] else 'ok':>8}")
	return "\n".join(lines)


def plot(rows, path):
	"""Writes a PNG of RSS growth over steps, one line per variant; returns `path`."""
	import matplotlib
	matplotlib.use("Agg")
	import matplotlib.pyplot as plt
	fig, ax = plt.subplots(figsize=(7, 4))
	for r in rows:
		steps, mb = zip(*r["curve"])
		ax.plot(steps, mb, label=r["variant"])
	ax.set_xlabel("training step (after warm-up)")
	ax.set_ylabel("RSS growth (MB)")
	ax.set_title("MoE gate memory: fork-style leaky block vs MoEBlock")
	ax.legend()
	ax.grid(alpha=0.3)
	fig.tight_layout()
	fig.savefig(path, dpi=120)
	plt.close(fig)
	return path


def _parser():
	p = argparse.ArgumentParser(prog="tdmpc2-moe demo", description=__doc__.strip().splitlines()[0])
	p.add_argument("--steps", type=int, default=2000, help="training steps per variant (default 2000)")
	p.add_argument("--warmup", type=int, default=100, help="unmeasured steps before each variant's measurement")
	p.add_argument("--batch", type=int, default=256, help="rows per forward (default 256)")
	p.add_argument("--experts", type=int, default=4)
	p.add_argument("--top-k", type=int, default=2)
	p.add_argument("--history-rows", type=int, default=65536, help="MoEBlock's gate history ring rows")
	p.add_argument("--plan-forwards", type=int, default=1, help="no_grad forwards per training step (default 1)")
	p.add_argument("--sample-every", type=int, default=50, help="steps between memory samples (default 50)")
	p.add_argument("--threshold", type=float, default=5.0, help="MemoryMonitor leak threshold, MB per 1000 steps")
	p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: the model is small)")
	p.add_argument("--seed", type=int, default=0)
	p.add_argument("--out", default="moe_demo", help="directory for memory.png (default ./moe_demo)")
	return p


def _run_all(args):
	"""Runs every variant on the same teacher task; returns their result dicts."""
	torch.manual_seed(args.seed)
	teacher = plain_mlp(IN_DIM, [64], OUT_DIM).requires_grad_(False)
	for m in teacher:
		if isinstance(m, torch.nn.Linear):
			# A teacher with larger weights than TD-MPC2's init, so there is something to learn.
			torch.nn.init.normal_(m.weight, std=0.3)
	print(f"tdmpc2-moe demo: {args.steps} steps x batch {args.batch}, E={args.experts}, k={args.top_k}, "
		  f"{args.plan_forwards} no_grad + 1 training forward per step")
	rows = []
	for variant in VARIANTS:
		rows.append(run_variant(variant, args, teacher))
		print(f"  {variant}: {rows[-1]['steps_per_s']:.1f} steps/s, final loss {rows[-1]['loss']:.4f}", flush=True)
		gc.collect()
	return rows


def main(argv=None):
	"""Runs the demo; returns the process exit code."""
	args = _parser().parse_args(argv)
	for name in ("steps", "batch", "experts", "top_k", "history_rows", "sample_every", "threads"):
		if getattr(args, name) < 1:
			raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
	for name in ("plan_forwards", "warmup"):
		if getattr(args, name) < 0:
			raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
	threads = torch.get_num_threads()
	torch.set_num_threads(args.threads)
	try:
		with warnings.catch_warnings():
			warnings.filterwarnings("ignore", message="tdmpc2_moe._C is not built")
			rows = _run_all(args)
	finally:
		torch.set_num_threads(threads)
	print()
	print(format_table(rows))
	os.makedirs(args.out, exist_ok=True)
	path = plot(rows, os.path.join(args.out, "memory.png"))
	print(f"\nmemory over steps: {path}")
	return 0
