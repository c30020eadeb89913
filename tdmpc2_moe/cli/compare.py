"""`tdmpc2-moe compare DIR [DIR ...] [--out OUT] [--by key ...] [--at STEP ...]`: tables and plots of training runs (tdmpc2_moe/analysis/compare.py)."""
import argparse
import sys
from pathlib import Path

from ..analysis import compare


def main(argv=None):
	"""Entry point; returns 0, or 1 with one line on stderr when a directory is missing or holds no run."""
	parser = argparse.ArgumentParser(prog="tdmpc2-moe compare", description=__doc__.split(":", 1)[1].strip())
	parser.add_argument("dirs", nargs="+", metavar="DIR", help="directories holding runs (upstream's logs/, a sweep's)")
	parser.add_argument("--out", default="compare", help="where the table, CSV and plots go (default ./compare)")
	parser.add_argument("--by", nargs="+", metavar="key", help="the config keys that name variants (default: those that differ)")
	parser.add_argument("--at", nargs="+", type=float, metavar="STEP", help="steps of the table (default: every evaluated step)")
	args = parser.parse_args(argv)
	for d in args.dirs:
		if not Path(d).is_dir():
			print(f"tdmpc2-moe compare: {d}: no such directory", file=sys.stderr)
			return 1
	lines = compare.compare(args.dirs, args.out, args.by, args.at)
	if lines[0].startswith("read 0 runs"):
		print(f"tdmpc2-moe compare: no run with evaluations under {', '.join(args.dirs)}", file=sys.stderr)
		print("\n".join(lines[1:2]), file=sys.stderr)
		return 1
	print("\n".join(lines))
	return 0
