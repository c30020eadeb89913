"""
`tdmpc2-moe import-fork --tdmpc2 PATH FORK_CKPT --out OUT.pt [--tau-dynamics X] [--tau-reward Y] [key=value ...]`:
turns a checkpoint written by the TD-MPC2 fork's `save` into one of this plugin's, for the model
`use_moe=true moe_preset=fork` builds with the run's `key=value` (TD-MPC2 and plugin config keys,
e.g. `task=walker-walk model_size=5 steps=3000000`).

The world model is built on the CPU from upstream's config; its observation and action sizes come
from the task's environment (upstream's `make_env`), or from the file's shapes when TD-MPC2 cannot
make that environment here (a single-task run of a suite not installed on this machine). Every
parameter is mapped (tdmpc2_moe/runs/fork_import.py says how), checked against the model's shape, and
written in the format the patched agent's `save` writes, so `agent.load(OUT.pt)`, `tdmpc2-moe play
--checkpoint OUT.pt` and `tdmpc2-moe train ... checkpoint=OUT.pt` take it. The temperatures, which
the fork does not save, come from the flags (default 1.8, what the fork's own reload gives; its logs
hold the live values). Nothing is written when anything does not fit; the error is one line.
"""
import argparse
import os
import sys

import torch

from ..runs import fork_import
from ..runs.fork_import import ForkImportError
from ..settings.checks import first_line


def _parser():
	parser = argparse.ArgumentParser(
		prog="tdmpc2-moe import-fork",
		description="Import a checkpoint of the TD-MPC2 fork (MooreTDMPC) as a tdmpc2-moe checkpoint of "
					"use_moe=true moe_preset=fork.")
	parser.add_argument("--tdmpc2", metavar="PATH", default=None,
						help="TD-MPC2 checkout (root or its tdmpc2/ directory); default $TDMPC2_ROOT")
	parser.add_argument("fork_checkpoint", metavar="FORK_CKPT", help="a file written by the fork's agent.save")
	parser.add_argument("--out", metavar="OUT.pt", required=True, help="the checkpoint to write")
	parser.add_argument("--tau-dynamics", type=float, default=fork_import.FORK_TEMPERATURE, metavar="X",
						help="the dynamics head's gate temperature (default 1.8, the fork's start)")
	parser.add_argument("--tau-reward", type=float, default=fork_import.FORK_TEMPERATURE, metavar="Y",
						help="the reward head's gate temperature (default 1.8)")
	parser.add_argument("overrides", nargs="*", metavar="key=value",
						help="config keys of the fork run, e.g. task=walker-walk model_size=5 steps=3000000")
	return parser


def _overrides(args, state):
	keys = {o.split("=", 1)[0].lstrip("+") for o in args.overrides}
	for fixed in ("use_moe", "moe_preset", "device"):
		if fixed in keys:
			raise ForkImportError(f"{fixed}= is set by import-fork (use_moe=true moe_preset=fork device=cpu); drop it")
	extra = [] if "moe_experts" in keys else [f"moe_experts={fork_import.experts_of(state)}"]
	return ["use_moe=true", "moe_preset=fork", "device=cpu", *extra, *args.overrides]


def _shape_from_task(cfg, state):
	"""Sets the cfg's environment keys from the task's environment, else from the file; returns where they came from."""
	os.environ.setdefault("MUJOCO_GL", "egl")
	from envs import make_env
	try:
		make_env(cfg)
		return f"the environment of task={cfg.task}"
	except Exception as exc:  # noqa: BLE001 (a missing suite fails in many ways: import, registration, rendering)
		if cfg.multitask:
			raise ForkImportError(f"task={cfg.task}: TD-MPC2 could not make the environments of its tasks "
								  f"({first_line(exc, 200, type(exc).__name__)})") from None
		reason = first_line(exc, 200, type(exc).__name__)
	encoder = state.get("_encoder.state.0.weight")
	pi_last = max((k for k in state if k.startswith("_pi.") and k.endswith(".weight")), default=None,
				  key=lambda k: int(k.split(".")[1]))
	if encoder is None or pi_last is None:
		raise ForkImportError(f"task={cfg.task}: TD-MPC2 could not make its environment ({reason}) and the file has "
							  "no state encoder / policy to read the sizes from")
	cfg.obs_shape = {"state": (encoder.shape[1],)}
	cfg.action_dim = state[pi_last].shape[0] // 2
	return f"the file's shapes (_encoder.state.0.weight, {pi_last}; TD-MPC2 could not make task={cfg.task}: {reason})"


def convert(args):
	"""Runs the import for parsed `args`; returns the lines to print. Raises ForkImportError for bad input."""
	from ..upstream import patching, checkout
	state = fork_import.read(args.fork_checkpoint)
	overrides = _overrides(args, state)
	try:
		cfg = checkout.load_cfg(overrides, args.tdmpc2)
	except FileNotFoundError as exc:
		raise ForkImportError(f"--tdmpc2: {first_line(exc, 200, type(exc).__name__)}") from None
	except Exception as exc:  # noqa: BLE001 (Hydra and upstream's parse_cfg raise many kinds)
		raise ForkImportError(f"cannot compose the TD-MPC2 config with {args.overrides}: {first_line(exc, 200, type(exc).__name__)}") from None
	patching.patch(device="cpu")
	try:
		from ..settings.record import MoESettings
		settings = MoESettings.resolve(cfg)
	except ValueError as exc:
		raise ForkImportError(first_line(exc, 200, type(exc).__name__)) from None
	for flag, tau in (("--tau-dynamics", args.tau_dynamics), ("--tau-reward", args.tau_reward)):
		low, high = settings.moe_temperature_bounds
		if not low <= tau <= high:
			raise ForkImportError(f"{flag}={tau} is outside moe_temperature_bounds [{low}, {high}]")
	sizes = _shape_from_task(cfg, state)
	from common.world_model import WorldModel
	model = WorldModel(cfg)
	layout = dict(latent_dim=cfg.latent_dim, action_dim=cfg.action_dim, task_dim=cfg.task_dim if cfg.multitask else 0,
				  num_q=cfg.num_q)
	mapped, lines = fork_import.map_state(args.fork_checkpoint, state, model.state_dict(), layout=layout,
										  temperatures={"dynamics": args.tau_dynamics, "reward": args.tau_reward})
	model.load_state_dict(mapped)
	tmp = f"{args.out}.tmp"
	os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
	torch.save(patching.checkpoint_of(model), tmp)
	os.replace(tmp, args.out)
	dropped = sorted(k for k in state if fork_import.is_unused(k))
	steps = {h: int(state[f"_{h}.global_step"]) for h in ("dynamics", "reward")}
	return [f"read {args.fork_checkpoint}: the fork's model with {fork_import.experts_of(state)} experts, "
			f"{len(state)} keys; sizes from {sizes}",
			*[f"  {line}" for line in lines],
			f"  not imported (nothing the model runs): {len(dropped)} keys: the experts' unused template "
			"(unit_model), the logged aux sum (_aux_loss), the Q ensemble's duplicate entry 0 (module)",
			f"temperatures: dynamics {args.tau_dynamics}, reward {args.tau_reward}; training forwards so far: "
			f"dynamics {steps['dynamics']}, reward {steps['reward']}; freeze "
			f"{settings.moe_temperature_freeze} forwards (steps={cfg.steps})",
			f"wrote {args.out}: agent.load, tdmpc2-moe play --checkpoint and tdmpc2-moe train checkpoint= take it "
			"with the same key=value"]


def main(argv=None):
	"""Entry point of `tdmpc2-moe import-fork`; returns 0, or 1 with one line on stderr for bad input."""
	# Intermixed: the key=value after FORK_CKPT and --out are positionals too, as the usage line writes them.
	args = _parser().parse_intermixed_args(argv)
	try:
		lines = convert(args)
	except ForkImportError as exc:
		print(f"tdmpc2-moe import-fork: {exc}", file=sys.stderr)
		return 1
	print("\n".join(lines))
	return 0
