"""
Runs the TD-MPC2 fork's own agent (SC-Levi/boya_tdmpc2 at e42a5c0, "MooreTDMPC", a checkout named by
$FORK_ROOT) on the CPU and writes what the import tests compare against: a checkpoint written by its
own `save`, and its own outputs on fixed inputs. Run as a script in its own process:

    python tests/fork_agent.py FORK_ROOT TASK OUT_DIR

The fork imports its modules by the same top-level names as upstream TD-MPC2 (`common`, ...), so it
cannot share a process with the patched upstream agent; the test runs this file in a subprocess.

The checkout is not edited. Its agent hard-codes `cuda:0` and `capturable=True` (a CUDA-only Adam
option); only those are changed, at run time: the agent module's `torch` is a view of torch whose
`device`, `tensor` and `optim.Adam` map cuda:0 to the CPU and drop `capturable`. Everything else
(the world model, its MoEBlocks, `update`, `save`) is the fork's code as it is.

Also records four facts about the fork that change what its users trained (docs/coming_from_the_fork.md
states them): whether its policy loss has a gradient through Q, whether its Q ensemble's zero-init
reached the modules, whether its checkpoint holds the temperature, and what building an episodic
agent raises.

Writes OUT_DIR/fork.pt (the fork's `save` after UPDATES of its own updates, with each MoE block's
`global_step` moved to its `freeze_steps` first, so that its temperatures move on the next training
forwards) and OUT_DIR/reference.pt: the inputs, every head's eval-mode outputs, and TRAIN_FORWARDS
train-mode forwards of dynamics and reward past the freeze with the temperatures after each.
"""
import os
import sys
import tempfile
import types
from pathlib import Path

import torch

UPDATES, TRAIN_FORWARDS, ROWS, BATCH = 10, 6, 16, 8
# Shapes as upstream's environments report them (walker-walk; mt30 padded to its largest task).
MT30_ACTION_DIMS = [6, 6, 6, 6, 2, 2, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 5, 4, 4, 6, 6, 6, 6, 6, 6, 4, 3, 3, 2, 1]
OVERRIDES = ["model_size=1", "use_moe=true", "compile=false", f"batch_size={BATCH}", "steps=100000",
			 "disable_wandb=true", "+monitor_mem_interval=1000000"]


def fork_cfg(pkg, task):
	"""The fork's config.yaml composed with OVERRIDES and `task`, through its own `parse_cfg`, shaped like the task's environment."""
	from hydra import compose, initialize_config_dir
	from hydra.core.hydra_config import HydraConfig
	from omegaconf import OmegaConf, open_dict
	base = OmegaConf.load(pkg / "config.yaml")
	del base["defaults"]  # its hydra/launcher default needs hydra-submitit-launcher, unused in one process
	with tempfile.TemporaryDirectory() as tmp:
		OmegaConf.save(base, Path(tmp) / "config.yaml")
		with initialize_config_dir(config_dir=tmp, version_base=None):
			cfg = compose(config_name="config", overrides=[f"task={task}", *OVERRIDES], return_hydra_config=True)
	HydraConfig.instance().set_config(cfg)
	with open_dict(cfg):
		del cfg["hydra"]
	from common.parser import parse_cfg
	cfg = parse_cfg(cfg)
	with open_dict(cfg):
		cfg.obs_shape = {"state": [24]}
		cfg.action_dim = 6
		cfg.episode_length = 500
		if cfg.multitask:
			cfg.obs_shapes = [24] * len(cfg.tasks)
			cfg.action_dims = MT30_ACTION_DIMS
			cfg.episode_lengths = [500] * len(cfg.tasks)
	return cfg


def torch_on_cpu():
	"""A view of the torch module in which cuda devices are the CPU and Adam has no `capturable`."""
	view = types.ModuleType("torch_on_cpu")
	view.__getattr__ = lambda name: getattr(torch, name)

	def device(spec=None, *args):
		return torch.device("cpu") if str(spec).startswith("cuda") else torch.device(spec, *args)

	def tensor(*args, device=None, **kwargs):
		return torch.tensor(*args, **kwargs)

	def adam(*args, capturable=False, **kwargs):
		return torch.optim.Adam(*args, **kwargs)

	view.device, view.tensor = device, tensor
	view.optim = types.SimpleNamespace(Adam=adam)
	return view


class RandomBatches:
	"""Stands in for the fork's replay buffer: `sample()` returns its 5-tuple of random tensors."""

	def __init__(self, cfg, generator):
		self.cfg, self.g = cfg, generator

	def sample(self):
		cfg, g = self.cfg, self.g
		h, b = cfg.horizon, cfg.batch_size
		obs = torch.randn(h + 1, b, cfg.obs_shape["state"][0], generator=g)
		action = torch.rand(h, b, cfg.action_dim, generator=g) * 2 - 1
		reward = torch.rand(h, b, 1, generator=g)
		terminated = torch.zeros(h, b, 1)
		task = torch.randint(0, len(cfg.tasks), (b,), generator=g) if cfg.multitask else None
		if task is not None:
			action = action * torch.tensor([[1.0] * d + [0.0] * (cfg.action_dim - d) for d in cfg.action_dims])[task]
		return obs, action, reward, terminated, task


def main(fork_root, task, out_dir):
	pkg = Path(fork_root).expanduser().resolve() / "tdmpc2"
	sys.path.insert(0, str(pkg))
	import Mooretdmpc
	Mooretdmpc.torch = torch_on_cpu()
	torch.manual_seed(0)
	cfg = fork_cfg(pkg, task)
	agent = Mooretdmpc.MooreTDMPC(cfg)
	facts = {"q_zero_init_reached_the_modules": any(
		bool((q[-1].weight == 0).all()) for q in agent.model._Qs.modules_list)}
	g = torch.Generator().manual_seed(1)
	batches = RandomBatches(cfg, g)
	for _ in range(UPDATES):
		agent.update(batches)
	model = agent.model
	blocks = {"dynamics": model._dynamics, "reward": model._reward}
	for block in blocks.values():
		block.global_step.fill_(block.freeze_steps)
	out = Path(out_dir)
	agent.save(out / "fork.pt")

	obs = torch.randn(ROWS, cfg.obs_shape["state"][0], generator=g)
	action = torch.rand(ROWS, cfg.action_dim, generator=g) * 2 - 1
	task_ids = torch.randint(0, len(cfg.tasks), (ROWS,), generator=g) if cfg.multitask else None
	ref = {"obs": obs, "action": action, "task": task_ids, "steps": cfg.steps, "horizon": cfg.horizon,
		   "freeze_steps": {h: b.freeze_steps for h, b in blocks.items()}}
	with torch.no_grad():
		z = model.encode(obs, task_ids)
		ref.update(z=z, next=model.next(z, action, task_ids), reward=model.reward(z, action, task_ids),
				   q_all=model.Q(z, action, task_ids, return_type="all"),
				   q_target=model.Q(z, action, task_ids, return_type="all", target=True))
		torch.manual_seed(7)
		pi_action, info = model.pi(z, task_ids)
		ref.update(pi_action=pi_action, pi_mean=info["mean"], pi_log_std=info["log_std"])
	# The policy loss of its update_pi: Q(..., detach=True) detaches Q's output, not only its parameters.
	pi_action_grad, _ = model.pi(z, task_ids)
	q = model.Q(z, pi_action_grad, task_ids, return_type="avg", detach=True)
	facts["pi_loss_has_a_gradient_through_q"] = q.requires_grad
	facts["checkpoint_holds_the_temperature"] = any("tau" in k for k in torch.load(out / "fork.pt")["model"])
	episodic = fork_cfg(pkg, task)
	episodic.episodic = True
	try:
		Mooretdmpc.MooreTDMPC(episodic)
		facts["episodic_agent_error"] = None
	except Exception as exc:  # noqa: BLE001 (whatever it raises is the fact recorded)
		facts["episodic_agent_error"] = f"{type(exc).__name__}: {exc}"
	ref["facts"] = facts
	# Training forwards past the freeze: each moves the block's temperature (a Python float in the fork).
	model.train()
	train = {h: {"out": [], "tau": []} for h in blocks}
	for _ in range(TRAIN_FORWARDS):
		train["dynamics"]["out"].append(model.next(z, action, task_ids).detach())
		train["reward"]["out"].append(model.reward(z, action, task_ids).detach())
		for h, block in blocks.items():
			train[h]["tau"].append(float(block.tau))
	model.eval()
	ref["train"] = {h: {"out": torch.stack(v["out"]), "tau": torch.tensor(v["tau"])} for h, v in train.items()}
	torch.save(ref, out / "reference.pt")


if __name__ == "__main__":
	if len(sys.argv) != 4:
		sys.exit(f"usage: {os.path.basename(sys.argv[0])} FORK_ROOT TASK OUT_DIR")
	main(*sys.argv[1:])
