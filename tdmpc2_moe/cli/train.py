"""
`tdmpc2-moe train --tdmpc2 PATH [key=value ...]`: upstream TD-MPC2's own training (its Hydra config
plus this plugin's keys, its OnlineTrainer/OfflineTrainer) with the patch applied (runs/training.py says
how it differs from upstream's `python train.py`); `-m key=a,b ...` is a Hydra multirun on the
config's launcher, as upstream's `train.py -m` (runs/sweep.py).
"""
import argparse
import sys

from ..runs import sweep, training

from ..upstream import checkout
from ..runs.checkpoint import CheckpointError
from ..settings.config_keys import config_defaults


def _parser():
	parser = argparse.ArgumentParser(
		prog="tdmpc2-moe train",
		description="Train TD-MPC2 with MoE heads through upstream's trainer. Any TD-MPC2 config key "
					f"or plugin key ({', '.join(config_defaults())}; patches/moe.yaml documents each) "
					"can be given as key=value.")
	parser.add_argument("--tdmpc2", metavar="PATH", default=None,
						help=f"TD-MPC2 checkout (root or its tdmpc2/ directory); default ${checkout.ENV_VAR}")
	parser.add_argument("-m", "--multirun", action="store_true",
						help="a Hydra sweep over comma-separated values (seed=1,2,3 use_moe=true,false) on the "
							 "config's launcher (hydra/launcher=joblib|submitit_local|submitit_slurm)")
	parser.add_argument("overrides", nargs="*", metavar="key=value", help="Hydra overrides, e.g. task=walker-walk")
	return parser


def main(argv=None):
	"""
	Entry point of `tdmpc2-moe train`; returns the exit code: 2 for bad arguments or a missing
	checkout, 1 (with a one-line message) for settings that cannot run (before any step: seed_steps
	under one episode) or a checkpoint that cannot be resumed from (naming the file).
	"""
	from hydra.errors import HydraException
	args = _parser().parse_args(argv)
	if args.multirun:
		try:
			code, lines = sweep.run(args.overrides, args.tdmpc2)
		except (sweep.SweepError, FileNotFoundError) as exc:
			print(f"tdmpc2-moe train -m: {exc}", file=sys.stderr)
			return getattr(exc, "exit_code", 2)
		print("\n".join(lines))
		return code
	try:
		cfg, settings, seed_steps = training.prepare(args.overrides, args.tdmpc2)
	except training.CannotRun as exc:
		print(f"tdmpc2-moe train: {exc}", file=sys.stderr)
		return 1
	except (ValueError, FileNotFoundError, HydraException) as exc:
		print(f"tdmpc2-moe train: {exc}", file=sys.stderr)
		return 2
	try:
		training.run(cfg, settings, seed_steps)
	except CheckpointError as exc:
		print(f"tdmpc2-moe train: {exc}", file=sys.stderr)
		return 1
	return 0
