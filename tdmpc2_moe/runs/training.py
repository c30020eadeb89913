"""
Training upstream TD-MPC2 with the patch applied, as `tdmpc2-moe train` and every job of a sweep do:
`prepare(overrides, path)` composes the config (upstream's Hydra config plus this plugin's keys) and
checks its settings, `run(cfg, settings, seed_steps)` runs upstream's own `train.train(cfg)`.

Differences from running upstream `python train.py` (none needs an edit to the checkout):
- the plugin's keys are part of the config, so `use_moe=true moe_experts=8` needs no `+`;
- hydra-submitit-launcher is not needed: the config is composed in-process without its launcher;
- `device=cpu` trains on a machine without CUDA (upstream's CUDA assert checks the chosen device);
- an explicit `seed_steps=N` is kept; upstream's `make_env` otherwise resets it to
  max(1000, 5 * episode_length), which makes short runs impossible;
- `checkpoint_interval=N`, `checkpoint_buffer=true`, `resume=true`: crash-safe checkpoints and resume
  (resume.py, checkpoint.py);
- the run's composed config (`config.yaml`) and `run.json` (status, wall time) are written into its
  work_dir next to upstream's `eval.csv`, for `tdmpc2-moe compare`;
- `checkpoint=PATH` (upstream's key, which its evaluate.py loads with `agent.load`) starts training
  from that model: the agent loads it right after it is built, before the first step. Only the
  world model comes from the file (what `agent.save` writes, or the model of a training checkpoint
  `checkpoints/latest.pt`); optimiser state, replay buffer and step count start fresh. `resume=true` with a run checkpoint present restores that instead;
- the task may be of any family of families/ (HumanoidBench `humanoid_<id>`, any Gymnasium id `gym:<id>`,
  upstream's MyoSuite tasks among upstream's), and `prepare` makes its environment once before any step
  or file, so that a task that cannot run is refused with one line (exit 1);
- `task=<name> tasks=[t1,t2,...]` trains a multitask agent over those tasks online (multitask_online.py;
  upstream trains multitask agents offline only, from its mt30/mt80 datasets).
"""
import contextlib
import importlib
import json
import os
import time
from pathlib import Path

from ..upstream import patching, checkout

from . import checkpoint, placement, resume
from .multitask_online import online_multitask_trainer
from ..families import task_sets
from ..families.family import TaskError
from ..upstream.device import torch_on
from ..settings.record import MoESettings
from ..settings.checks import first_line


@contextlib.contextmanager
def _replaced(module, name, replacement):
	"""While active, `module.<name>` is `replacement(original)`; the original is put back after."""
	original = getattr(module, name)
	setattr(module, name, replacement(original))
	try:
		yield
	finally:
		setattr(module, name, original)


def _keep_seed_steps(train_module, seed_steps):
	"""While active, `train_module.make_env` sets cfg.seed_steps back to `seed_steps` after upstream's heuristic."""
	if seed_steps is None:
		return contextlib.nullcontext()

	def keeping_seed_steps(make_env):
		def make_env_keeping_seed_steps(cfg):
			env = make_env(cfg)
			cfg.seed_steps = seed_steps
			return env
		return make_env_keeping_seed_steps
	return _replaced(train_module, "make_env", keeping_seed_steps)


def initial_checkpoint(cfg):
	"""Returns the `checkpoint` path to start training from, or None when the key is unset (upstream's `???`). Raises ValueError for a missing file."""
	from omegaconf import OmegaConf
	if "checkpoint" not in cfg or OmegaConf.is_missing(cfg, "checkpoint") or cfg.checkpoint is None:
		return None
	path = os.path.expanduser(str(cfg.checkpoint))
	if not os.path.isfile(path):
		raise ValueError(f"checkpoint={cfg.checkpoint}: no such file (the model to start training from)")
	return path


def _start_from(train_module, path):
	"""While active, the agents `train_module` builds load the model at `path` once built (None: no change)."""
	if path is None:
		return contextlib.nullcontext()

	def loading(agent_cls):
		def agent_from_checkpoint(cfg):
			agent = agent_cls(cfg)
			agent.load(checkpoint.model_file(path))
			print(f"tdmpc2-moe train: starting from the model in checkpoint={path}")
			return agent
		return agent_from_checkpoint
	return _replaced(train_module, "TDMPC2", loading)


def _online_multitask(train_module, cfg):
	"""While active, a run over a task set of the user's (`tasks=[...]`) trains online: upstream's train.py picks
	its OfflineTrainer for every multitask cfg, which here is the online multitask trainer (multitask_online.py)."""
	if task_sets.explicit_tasks(cfg) is None:
		return contextlib.nullcontext()
	return _replaced(train_module, "OfflineTrainer", lambda _: online_multitask_trainer(train_module.OnlineTrainer))


def prepare(overrides, path=None):
	"""
	Returns (cfg, settings, seed_steps): the composed config, the plugin settings it holds and the
	explicit seed_steps (None when not given). Raises ValueError for a bad setting, FileNotFoundError
	for a missing checkout, and Hydra's errors for unknown keys.
	"""
	from omegaconf import OmegaConf
	cfg = checkout.compose(overrides, path)
	settings = MoESettings.resolve(cfg)
	resume.check_supported(cfg, settings)
	initial_checkpoint(cfg)
	seed_steps = None if OmegaConf.is_missing(cfg, "seed_steps") else cfg.seed_steps
	if seed_steps is not None and (isinstance(seed_steps, bool) or not isinstance(seed_steps, int) or seed_steps < 0):
		raise ValueError(f"seed_steps must be an int >= 0, got {seed_steps!r}")
	check_seed_steps(cfg, settings, seed_steps, check_environment(cfg, path))
	return cfg, settings, seed_steps


class CannotRun(ValueError):
	"""Settings that are each valid but cannot run together (found before any step); the message is one line."""


# (task, obs, episodic, env_module, tasks, checkout) -> the episode length of a run's environment, once
# made: a sweep's combinations differ mostly in seeds and MoE keys, so each environment is made once.
_environments_checked = {}


def _plain(value):
	return None if value is None else tuple(value) if not isinstance(value, str) else value


def check_environment(cfg, path=None):
	"""
	Makes the run's environment once with the patched `make_env` (as upstream's training will, with the
	plugin's task families), before any step or file; returns its episode length (the first task's for a
	multitask set; None for upstream's mt30/mt80, whose environments are upstream's DMC tasks). Raises
	CannotRun with the family's one line: an unknown task (with the closest names), a family whose
	package is missing (with its install command), what a family refuses.
	"""
	import copy
	from omegaconf import OmegaConf, open_dict
	if str(cfg.task) in task_sets.UPSTREAM_SETS and task_sets.explicit_tasks(cfg) is None:
		return None
	key = (str(cfg.task), str(cfg.obs), bool(cfg.get("episodic", False)), _plain(cfg.get("env_module", None)),
		   _plain(task_sets.explicit_tasks(cfg)), None if path is None else str(path))
	if key not in _environments_checked:
		# Upstream's train.py defaults MUJOCO_GL to egl before its environments import their renderer; so here.
		os.environ.setdefault("MUJOCO_GL", "egl")
		patching.patch()
		from common.parser import parse_cfg
		from envs import make_env
		probe = copy.deepcopy(cfg)
		with open_dict(probe):
			if OmegaConf.is_missing(probe, "model_size"):
				probe.model_size = 1  # the environment does not depend on it; parse_cfg needs one
		try:
			parsed = parse_cfg(probe)
			env = make_env(parsed)
		except TaskError as exc:
			raise CannotRun(str(exc)) from None
		_environments_checked[key] = int(env.max_episode_steps)
		# Closed now: a renderer left to the interpreter's exit outlives its EGL display (HumanoidBench's viewer).
		with contextlib.suppress(AttributeError):  # upstream's DMC wrapper has no close
			env.close()
	return _environments_checked[key]


def check_seed_steps(cfg, settings, seed_steps, length):
	"""
	Raises CannotRun when an explicit `seed_steps` is shorter than one episode (`length` steps) of a
	single-task run that upstream's own loop trains: its first update would read a replay buffer that
	holds no episode yet (AttributeError: 'Buffer' object has no attribute '_buffer'). The loop with
	checkpoints (`checkpoint_interval`, `resume`) and the online multitask loop wait for the first
	episode, so there it runs.
	"""
	if seed_steps is None or length is None or settings.checkpoint_interval or settings.resume \
			or task_sets.explicit_tasks(cfg) is not None:
		return
	if seed_steps < length:
		raise CannotRun(f"seed_steps={seed_steps} is shorter than one episode of {cfg.task} ({length} steps): upstream's "
						f"first update would read a replay buffer with no episode in it; use seed_steps={length} or more "
						"(or checkpoint_interval > 0, whose loop waits for the first episode)")


def work_dir(cfg):
	"""Returns the run's work_dir as upstream's parse_cfg sets it: <original cwd>/logs/<task>/<seed>/<exp_name>."""
	from hydra.utils import get_original_cwd
	return Path(get_original_cwd()) / "logs" / str(cfg.task) / str(cfg.seed) / str(cfg.exp_name)


def _write_run_files(cfg, settings, status, start):
	# The run's config, how it went and where it ran, next to upstream's eval.csv: what `tdmpc2-moe
	# compare` reads.
	from omegaconf import OmegaConf
	out = work_dir(cfg)
	out.mkdir(parents=True, exist_ok=True)
	if status == "running":
		OmegaConf.save(cfg, out / "config.yaml")
	record = dict(status=status, wall_s=time.time() - start, steps=int(cfg.steps), **placement.run_device(settings.device))
	(out / "run.json").write_text(json.dumps(record) + "\n")


def run(cfg, settings, seed_steps=None):
	"""
	Trains with upstream's `train.train(cfg)` with the patch applied (settings come from `cfg`); returns
	when done. Writes the composed config and `run.json` (status, wall time, the device and threads it
	ran on) into the run's work_dir.
	"""
	# Upstream's train.py defaults MUJOCO_GL to egl at import; a user's choice is kept.
	os.environ.setdefault("MUJOCO_GL", "egl")
	patching.patch()
	train_module = importlib.import_module("train")
	start = time.time()
	_write_run_files(cfg, settings, "running", start)
	with torch_on(train_module, settings.device), _keep_seed_steps(train_module, seed_steps), \
			_start_from(train_module, initial_checkpoint(cfg)), resume.resumable(train_module, settings), \
			_online_multitask(train_module, cfg):
		train_module.train(cfg)
	_write_run_files(cfg, settings, "finished", start)
