"""
Update and `act` of benchmarks/test_update.py with one process per measurement: for each repeat, every
(test, variant) pair runs in a fresh pytest process of its own, in turn (variants alternated, so that a
slow spell of a shared machine falls on all of them alike), on one torch thread, timed in process CPU
time. Prints the table of medians over the processes (each process's own figure is pytest-benchmark's
median over its rounds) and their ratios to plain; writes every process's figure to --out.

	cd benchmarks && TDMPC2_ROOT=/path/to/tdmpc2 python alternate.py --repeats 3 \\
		--variants plain moe_matched moe_matched_patched moe_no_bookkeeping fork_preset \\
		--cfg "batch_size=64 num_samples=128" --out b64.json
	python alternate.py --show b64.json
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS = {"update": "test_update_step", "act": "test_act"}


def run_one(test, variant, cfg, update_rounds, act_rounds, package=None):
	"""
	Returns the median (ms) of `test` for `variant` measured in a fresh process, with the tdmpc2_moe
	installed in this environment or, given `package`, the source tree there (with its `_C` built in place).
	"""
	env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", UPDATE_BENCH_CFG=cfg,
			   UPDATE_BENCH_ROUNDS=str(update_rounds), ACT_BENCH_ROUNDS=str(act_rounds))
	if package:
		env["PYTHONPATH"] = str(package)
	with tempfile.TemporaryDirectory() as tmp:
		out = Path(tmp) / "bench.json"
		done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
							   f"test_update.py::{TESTS[test]}[{variant}]", "--benchmark-timer=time.process_time",
							   f"--benchmark-json={out}"], cwd=HERE, env=env, capture_output=True, text=True)
		if done.returncode != 0:
			raise RuntimeError(f"{test}[{variant}] failed:\n{done.stdout[-3000:]}\n{done.stderr[-2000:]}")
		return json.loads(out.read_text())["benchmarks"][0]["stats"]["median"] * 1e3


def table(record):
	"""Returns the markdown table of a record {"runs": {test: {variant: [ms, ...]}}}."""
	runs = record["runs"]
	variants = list(next(iter(runs.values())))
	lines = ["| variant | " + " | ".join(f"{t} ms (per process) | {t} median | / plain" for t in runs) + " |",
			 "|---|" + "---|---|---|" * len(runs)]
	for v in variants:
		cells = []
		for t in runs:
			ms = runs[t].get(v)
			if not ms:
				cells.append("- | - | -")
				continue
			med, plain = statistics.median(ms), statistics.median(runs[t]["plain"])
			cells.append(f"{', '.join(f'{m:.1f}' for m in ms)} | {med:.1f} | {med / plain:.2f}x")
		lines.append(f"| {v} | {' | '.join(cells)} |")
	return "\n".join(lines)


def main(argv=None):
	parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
	parser.add_argument("--variants", nargs="+", default=["plain", "moe_matched", "moe_no_bookkeeping", "fork_preset"])
	parser.add_argument("--tests", nargs="+", default=list(TESTS), choices=list(TESTS))
	parser.add_argument("--repeats", type=int, default=3)
	parser.add_argument("--cfg", default="", help="upstream overrides for every variant (UPDATE_BENCH_CFG)")
	parser.add_argument("--update-rounds", type=int, default=20)
	parser.add_argument("--act-rounds", type=int, default=5)
	parser.add_argument("--before", type=Path, help="a source tree of older code, `_C` built in place: its "
						"--before-variants run too, alternated with the rest, as <variant>@before")
	parser.add_argument("--before-variants", nargs="*", default=[])
	parser.add_argument("--out", type=Path)
	parser.add_argument("--show", type=Path, help="print the table of a saved --out file and exit")
	args = parser.parse_args(argv)
	if args.show:
		print(table(json.loads(args.show.read_text())))
		return 0
	if "plain" not in args.variants:
		parser.error("--variants must include plain (the ratios are to it)")
	import tdmpc2_moe
	runs = [(v, None) for v in args.variants] + [(v, args.before) for v in args.before_variants if args.before]
	label = {run: run[0] + ("@before" if run[1] else "") for run in runs}
	record = {"cfg": args.cfg, "backend": tdmpc2_moe.backend(), "before": str(args.before or ""),
			  "runs": {t: {label[r]: [] for r in runs} for t in args.tests}}
	if args.before:
		done = subprocess.run([sys.executable, "-c", "import tdmpc2_moe; print(tdmpc2_moe.backend(), tdmpc2_moe.__file__)"],
							  env=dict(os.environ, PYTHONPATH=str(args.before)), capture_output=True, text=True, cwd="/")
		record["before_backend"] = done.stdout.strip()
	print(f"backend {record['backend']}, before {record.get('before_backend', '-')}, cfg {args.cfg!r}", flush=True)
	for repeat in range(args.repeats):
		for test in args.tests:
			for run in runs:
				variant = label[run]
				if test == "act" and run[0] == "moe_matched_patched":
					continue  # act runs no update: the same as moe_matched
				ms = run_one(test, run[0], args.cfg, args.update_rounds, args.act_rounds, run[1])
				record["runs"][test][variant].append(ms)
				print(f"repeat {repeat} {test}[{variant}] {ms:.1f} ms", flush=True)
				if args.out:
					args.out.write_text(json.dumps(record, indent=1))
	record["runs"].get("act", {}).pop("moe_matched_patched", None)
	if args.out:
		args.out.write_text(json.dumps(record, indent=1))
	print(table(record))
	return 0


if __name__ == "__main__":
	sys.exit(main())
