"""
`tdmpc2-moe analyze PATH [--out DIR]`: the summary table and plots of a saved weight_stats.npz
(written by `play`; for a multitask file also the per-task routing table and task x expert heatmap),
or, for a directory, routing over training from its gate snapshots (`work_dir` or `work_dir/gates`,
written with gate_snapshot_interval=N).
"""
import argparse
import os
import sys

from ..analysis.gate_snapshots import write_training_report
from ..analysis.gate_plots import write_report
from ..analysis.gate_stats import check_out_dir, load_tasks, load_weight_stats


def main(argv=None):
	"""`tdmpc2-moe analyze PATH [--out DIR]`; returns the process exit code."""
	parser = argparse.ArgumentParser(prog="tdmpc2-moe analyze",
									 description="Summary table and plots of the gate weights in a weight_stats.npz.")
	parser.add_argument("weight_stats", help="a weight_stats.npz written by `tdmpc2-moe play`, or a training "
						"work_dir (or its gates/ directory) with gate snapshots")
	parser.add_argument("--out", default=None, help="output directory (default: the file's directory, or the directory)")
	args = parser.parse_args(argv)
	try:
		if os.path.isdir(args.weight_stats):
			write_training_report(args.weight_stats, check_out_dir(args.out or args.weight_stats))
			return 0
		per_head, episode_lengths, dominance = load_weight_stats(args.weight_stats)
		tasks = load_tasks(args.weight_stats)
		out_dir = check_out_dir(args.out or os.path.dirname(os.path.abspath(args.weight_stats)))
		write_report(out_dir, per_head, episode_lengths, dominance, tasks=tasks)
	except (ValueError, OSError) as exc:
		print(f"tdmpc2-moe analyze: error: {exc}", file=sys.stderr)
		return 1
	return 0


if __name__ == "__main__":
	sys.exit(main())
