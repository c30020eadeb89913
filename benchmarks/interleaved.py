"""
Update steps of several variants of benchmarks/test_update.py's agent in one process, interleaved: one
update of each variant in turn, 150 times, on one torch thread, in process CPU time; prints each
variant's median and quartiles. A check on alternate.py's figures (one process per measurement): here
every variant meets the same moments of a shared machine, but the agents also share its caches.

	cd benchmarks && TDMPC2_ROOT=/path/to/tdmpc2 UPDATE_BENCH_CFG="batch_size=64 num_samples=128" \
		python interleaved.py plain moe_matched moe_matched_patched
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None):
	parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
	parser.add_argument("variants", nargs="+")
	parser.add_argument("--rounds", type=int, default=150)
	parser.add_argument("--warmup", type=int, default=20)
	args = parser.parse_args(argv)
	torch.set_num_threads(1)
	from _pytest.monkeypatch import MonkeyPatch
	from tdmpc2_moe import backend
	from tdmpc2_moe.upstream import checkout
	checkout.activate()
	import test_update
	agents = {variant: test_update._agent(variant, MonkeyPatch()) for variant in args.variants}
	for agent, buffer in agents.values():
		for _ in range(args.warmup):
			agent.update(buffer)
	times = {variant: [] for variant in agents}
	for _ in range(args.rounds):
		for variant, (agent, buffer) in agents.items():
			start = time.process_time()
			agent.update(buffer)
			times[variant].append((time.process_time() - start) * 1e3)
	print(f"backend {backend()}; {args.rounds} interleaved updates each, process time, ms")
	base = statistics.median(times[args.variants[0]])
	for variant, values in times.items():
		q1, median, q3 = statistics.quantiles(values, n=4)
		print(f"{variant:24s} median {median:7.2f}  quartiles {q1:7.2f} {q3:7.2f}  / {args.variants[0]} {median / base:.2f}x")


if __name__ == "__main__":
	main()
