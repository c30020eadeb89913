"""
The patched `make_env` (docs/design.md 21): upstream's `envs.make_env` with the plugin's task families
beside upstream's, upstream unmodified. A single task goes to the family whose names include it: the
plugin's families build it (then upstream's TensorWrapper and the cfg keys upstream's make_env sets:
obs_shape, action_dim, episode_length, seed_steps), upstream's own go to upstream's make_env. A multitask
cfg goes to upstream's make_env, whose `make_multitask_env` calls the module's `make_env`, this one, for
each of its tasks: so the plugin's families work inside upstream's MultitaskWrapper too.

Whatever cannot run raises TaskError with one line naming the task: a family whose package is missing
(with the install command), an unknown name (with the closest known ones), and what a family refuses;
upstream's own errors for its families are cut to their first line.
"""
import functools

from .family import TaskError, closest
from .registry import family_of, known_tasks
from ..settings.checks import first_line


def set_cfg_keys(cfg, env):
	"""Sets on `cfg` what upstream's make_env derives from a single-task environment, as it does."""
	cfg.obs_shape = {cfg.get("obs", "state"): env.observation_space.shape}
	cfg.action_dim = env.action_space.shape[0]
	cfg.episode_length = env.max_episode_steps
	cfg.seed_steps = max(1000, 5 * cfg.episode_length)


def make_single(cfg, upstream_make_env):
	"""Returns the environment of single-task `cfg`, from its family or upstream's make_env. Raises TaskError."""
	task = str(cfg.task)
	family = family_of(task)
	if family is not None:
		why = family.missing()
		if why:
			raise TaskError(f"task={task}: {why}")
	if family is None or family.make is None:
		try:
			return upstream_make_env(cfg)
		except Exception as exc:  # upstream raises ValueError for unknown names, anything for broken packages
			if family is None:
				raise TaskError(f"unknown task {task!r}: no task family has it (humanoid_<id> for HumanoidBench, "
								f"gym:<id> for any Gymnasium id){closest(task, known_tasks())}") from None
			raise TaskError(f"task={task}: upstream's {family.name} code could not make it "
							f"({type(exc).__name__}: {first_line(exc, 200)})") from None
	from envs.wrappers.tensor import TensorWrapper
	env = TensorWrapper(family.make(cfg))
	set_cfg_keys(cfg, env)
	return env


def patched_make_env(upstream_make_env):
	"""Returns upstream's `envs.make_env` with the plugin's task families (the module docstring)."""
	@functools.wraps(upstream_make_env)
	def make_env(cfg):
		import gymnasium as gym
		gym.logger.set_level(40)  # as upstream's make_env: Gymnasium's warnings off
		if cfg.multitask:
			return upstream_make_env(cfg)
		return make_single(cfg, upstream_make_env)
	return make_env
