"""`tdmpc2-moe`: train, play, import-fork, compare, analyze, demo, doctor. Each subcommand is a module of this package that parses its own flags."""
import importlib
import sys

COMMANDS = {
	"train": ("tdmpc2_moe.cli.train", "train TD-MPC2 with MoE heads through upstream's trainer"),
	"play": ("tdmpc2_moe.cli.play", "run a checkpoint and record how the gates weigh the experts"),
	"import-fork": ("tdmpc2_moe.cli.import_fork", "turn a checkpoint of the TD-MPC2 fork (MooreTDMPC) into a moe_preset=fork one"),
	"compare": ("tdmpc2_moe.cli.compare", "table and plots of training runs (a sweep's), grouped into variants"),
	"analyze": ("tdmpc2_moe.cli.analyze", "summary table and plots from a saved weight_stats.npz"),
	"demo": ("tdmpc2_moe.cli.demo", "leaky fork-style MoE vs MoEBlock, side by side (no TD-MPC2 needed)"),
	"doctor": ("tdmpc2_moe.cli.doctor", "what runs and why: versions, backend, checkout, patch, rendering"),
}


def _usage():
	lines = ["usage: tdmpc2-moe {" + ",".join(COMMANDS) + "} [args ...]", ""]
	lines += [f"  {name:<11} {help_}" for name, (_, help_) in COMMANDS.items()]
	return "\n".join(lines)


def main(argv=None):
	"""Entry point of the `tdmpc2-moe` command; returns the process exit code."""
	argv = list(sys.argv[1:] if argv is None else argv)
	if not argv or argv[0] in ("-h", "--help"):
		print(_usage())
		return 0 if argv else 2
	name, rest = argv[0], argv[1:]
	if name not in COMMANDS:
		print(f"tdmpc2-moe: unknown command {name!r}\n{_usage()}", file=sys.stderr)
		return 2
	module = importlib.import_module(COMMANDS[name][0])
	return module.main(rest)


if __name__ == "__main__":
	sys.exit(main())
