"""
Self CPU time per op of `update` or `act` for two variants of benchmarks/test_update.py's agent, side by
side in one process (torch.profiler over 10 updates or 5 acts after 20 warm-up updates, one torch thread),
sorted by the difference: where one variant's time goes that the other's does not. Also each variant's
median process time per call, measured before profiling.

	cd benchmarks && TDMPC2_ROOT=/path/to/tdmpc2 python profile_ops.py act plain moe_matched
	# an older tree: PYTHONPATH=/path/to/tree (its _C built in place); UPDATE_BENCH_CFG as test_update.py
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def profile(variant, what):
	"""Returns ({op: (ms per call, calls per call)}, median ms per call) of `what` for `variant`."""
	from _pytest.monkeypatch import MonkeyPatch
	import test_update
	from torch.profiler import ProfilerActivity
	agent, buffer = test_update._agent(variant, MonkeyPatch())
	for _ in range(20):
		agent.update(buffer)
	obs = torch.randn(24, generator=torch.Generator().manual_seed(0))
	step = (lambda: agent.update(buffer)) if what == "update" else (lambda: agent.act(obs, t0=True))
	n = 10 if what == "update" else 5
	times = []
	for _ in range(n):
		start = time.process_time()
		step()
		times.append(time.process_time() - start)
	with torch.profiler.profile(activities=[ProfilerActivity.CPU]) as prof:
		for _ in range(n):
			step()
	test_update.patching.unpatch()
	ops = {e.key: (e.self_cpu_time_total / n / 1e3, e.count / n) for e in prof.key_averages()}
	return ops, sorted(times)[n // 2] * 1e3


def main(argv=None):
	parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
	parser.add_argument("what", choices=["update", "act"])
	parser.add_argument("a")
	parser.add_argument("b")
	parser.add_argument("--rows", type=int, default=30, help="how many ops to print")
	args = parser.parse_args(argv)
	torch.set_num_threads(1)
	from tdmpc2_moe import backend
	from tdmpc2_moe.upstream import checkout
	checkout.activate()
	(ops_a, med_a), (ops_b, med_b) = profile(args.a, args.what), profile(args.b, args.what)
	print(f"backend {backend()}; {args.what}: {args.a} {med_a:.1f} ms, {args.b} {med_b:.1f} ms (median process time)")
	print(f"{'op':55s} {args.a:>12s} {args.b:>12s} {'diff ms':>9s}  calls")
	keys = sorted(set(ops_a) | set(ops_b), key=lambda k: -abs(ops_b.get(k, (0, 0))[0] - ops_a.get(k, (0, 0))[0]))
	for key in keys[:args.rows]:
		(ta, ca), (tb, cb) = ops_a.get(key, (0, 0)), ops_b.get(key, (0, 0))
		print(f"{key[:55]:55s} {ta:12.2f} {tb:12.2f} {tb - ta:+9.2f}  {ca:.0f} / {cb:.0f}")
	print(f"{'total self':55s} {sum(t for t, _ in ops_a.values()):12.2f} {sum(t for t, _ in ops_b.values()):12.2f}")
	return 0


if __name__ == "__main__":
	sys.exit(main())
