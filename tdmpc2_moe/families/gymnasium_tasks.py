"""
`gym:<id>`: any environment registered with Gymnasium as a TD-MPC2 task (docs/design.md 21), and the
adapter HumanoidBench's environments (Gymnasium environments too) go through.

`task=gym:Walker2d-v4` builds `gymnasium.make("Walker2d-v4", render_mode="rgb_array")`; `env_module=a,b`
imports those modules first (the ones that register a lab's own environments; `gym:pkg.mod:MyEnv-v0`,
Gymnasium's own "module:id" form, works too). The prefix is `gym:` because a Gymnasium id may hold
dashes, slashes (namespaces) and colons, none of which can then be read as upstream's `domain-task`.

What TD-MPC2 gets from `GymnasiumTask`:
- observations: one flat Box, as float32. Dict, image-shaped or non-Box observation spaces are
  refused (upstream's state path reads one vector; its obs=rgb path renders DMC tasks only);
- actions: upstream plans in [-1, 1]^d. A Box with other finite bounds is rescaled, per dimension,
  a_env = low + (a + 1) (high - low) / 2 (Humanoid-v4's +-0.4 is reached at +-1); `rescaled` says
  whether it is. Unbounded or non-Box action spaces are refused;
- episodes: end at the spec's `max_episode_steps` (what upstream reads as the episode length; an id
  registered without one is refused) or when the environment terminates. A termination is
  `info["terminated"]`, which upstream learns with `episodic=true`; an environment that says it
  terminates (Gymnasium MuJoCo's `terminate_when_unhealthy`) is refused with `episodic=false`, before
  any step, instead of stopping the run at its first fall;
- seeding: the first reset is seeded with cfg.seed (the patched trainer seeds the action space), so a
  seeded run repeats.
"""
import importlib
import math

import numpy as np

from .family import Family, TaskError, closest, modules_missing
from ..settings.checks import first_line, names

PREFIX = "gym:"


class GymnasiumTask:
	"""
	A Gymnasium environment in upstream TD-MPC2's interface: `reset() -> obs`, `step(a) -> (obs, reward,
	done, info)`, float32 observations, actions in [-1, 1] rescaled to the environment's bounds,
	`max_episode_steps`. `terminations=False` makes a termination end the episode without reading as
	one (`info["terminated"]` False): the fork's and HumanoidBench's own TD-MPC2 treat a fall so.
	"""

	def __init__(self, env, *, seed, max_episode_steps, terminations=True):
		import gymnasium as gym
		self.env = env
		space = env.action_space
		self._low = space.low.astype(np.float64)
		self._high = space.high.astype(np.float64)
		self._dtype = space.dtype
		self.rescaled = not (np.all(self._low == -1) and np.all(self._high == 1))
		self.action_space = gym.spaces.Box(-1.0, 1.0, shape=space.shape, dtype=np.float32)
		shape = env.observation_space.shape
		self.observation_space = gym.spaces.Box(-np.inf, np.inf, shape=shape, dtype=np.float32)
		self.max_episode_steps = int(max_episode_steps)
		self._seed = seed
		self._terminations = terminations
		# What Gymnasium's wrappers (upstream's TensorWrapper, Timeout, MultitaskWrapper) may read of the env.
		self.spec, self.metadata, self.render_mode = env.spec, env.metadata, env.render_mode
		self.reward_range = getattr(env, "reward_range", (-math.inf, math.inf))

	@property
	def unwrapped(self):
		return self.env.unwrapped

	def env_action(self, action):
		"""Returns the environment's action for TD-MPC2's `action` in [-1, 1]^d (clipped to it first)."""
		action = np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0)
		if self.rescaled:
			action = self._low + (action + 1.0) * 0.5 * (self._high - self._low)
		return action.astype(self._dtype)

	def reset(self):
		# Seeded once: later resets continue the environment's own generator, as DMC's do.
		obs, _ = self.env.reset(seed=self._seed)
		self._seed = None
		return np.asarray(obs, dtype=np.float32)

	def step(self, action):
		obs, reward, terminated, truncated, info = self.env.step(self.env_action(action))
		info = dict(info)
		info["terminated"] = bool(terminated) and self._terminations
		return np.asarray(obs, dtype=np.float32), float(reward), bool(terminated or truncated), info

	def render(self, *args, **kwargs):
		return self.env.render()

	def close(self):
		self.env.close()


def check_spaces(task, env):
	"""Raises TaskError naming `task` when `env`'s spaces are not one flat observation Box and one bounded action Box."""
	import gymnasium as gym
	obs, act = env.observation_space, env.action_space
	if isinstance(obs, gym.spaces.Dict):
		raise TaskError(f"task={task} has Dict observations ({', '.join(obs.spaces)}): TD-MPC2 reads one flat vector; "
						"flatten them (gymnasium.wrappers.FlattenObservation) in an environment registered by env_module")
	if not isinstance(obs, gym.spaces.Box) or len(obs.shape) != 1:
		shape = getattr(obs, "shape", None)
		raise TaskError(f"task={task} has {type(obs).__name__} observations of shape {shape}: TD-MPC2's state path reads "
						"one flat Box (images only through upstream's obs=rgb, which renders DMC tasks)")
	if not isinstance(act, gym.spaces.Box) or len(act.shape) != 1:
		raise TaskError(f"task={task} has {type(act).__name__} actions: TD-MPC2 plans continuous actions (a 1-D Box)")
	if not (np.all(np.isfinite(act.low)) and np.all(np.isfinite(act.high))) or np.any(act.high <= act.low):
		raise TaskError(f"task={task} has action bounds that are not finite with low < high "
						f"(low {act.low.min()}, high {act.high.max()}): they cannot be rescaled to TD-MPC2's [-1, 1]")


def import_env_modules(modules):
	"""Imports every module of `env_module` (a list, or one comma-separated string). Raises TaskError naming it."""
	if modules is None:
		return
	try:
		modules = names()("env_module", modules)
	except ValueError as exc:
		raise TaskError(str(exc)) from None
	for module in modules:
		try:
			importlib.import_module(module)
		except Exception as exc:  # whatever the module raises: the user needs its first line
			raise TaskError(f"env_module={module}: cannot import it ({type(exc).__name__}: {first_line(exc, 160)})") from None


def registered_spec(task, env_id):
	"""Returns Gymnasium's spec of `env_id` (importing the module of a "module:id"). Raises TaskError listing the closest ids."""
	import gymnasium as gym
	module, _, name = env_id.rpartition(":")
	if module:
		import_env_modules([module])
	if name not in gym.registry:
		raise TaskError(f"task={task}: no Gymnasium environment {name!r} is registered (env_module=<module> imports the "
						f"module that registers it){closest(name, gym.registry)}")
	return gym.registry[name]


def make_gymnasium(task, env_id, cfg, *, terminations=True, **kwargs):
	"""
	Returns `GymnasiumTask` for the registered `env_id` (after checking cfg.obs, the spec's episode
	length and the spaces); `kwargs` go to `gymnasium.make`. Raises TaskError with one line naming `task`.
	"""
	import gymnasium as gym
	if str(cfg.get("obs", "state")) != "state":
		raise TaskError(f"task={task} supports obs=state only (upstream's obs=rgb renders DMC tasks), got obs={cfg.obs}")
	spec = registered_spec(task, env_id)
	steps = spec.max_episode_steps
	if steps is None or not math.isfinite(steps) or steps < 1:
		raise TaskError(f"task={task}: {spec.id} is registered without max_episode_steps, which TD-MPC2 reads as its "
						"episode length; register it with one")
	try:
		# Frames for play's --record-video where the environment can render them (not every creator takes render_mode).
		creator = spec.entry_point if callable(spec.entry_point) else gym.envs.registration.load_env_creator(spec.entry_point)
		if "rgb_array" in (getattr(creator, "metadata", {}) or {}).get("render_modes", ()):
			kwargs = {"render_mode": "rgb_array", **kwargs}
		env = gym.make(spec.id, **kwargs)
	except Exception as exc:  # a missing simulator, a bad kwarg: one line, whatever Gymnasium raised
		raise TaskError(f"task={task}: Gymnasium could not make {spec.id} ({type(exc).__name__}: {first_line(exc, 200)})") from None
	check_spaces(task, env)
	if terminations and not cfg.get("episodic", False) and getattr(env.unwrapped, "_terminate_when_unhealthy", False):
		env.close()
		raise TaskError(f"task={task} ends episodes when it terminates (terminate_when_unhealthy): train it with "
						"episodic=true (upstream's termination head learns the terminations)")
	return GymnasiumTask(env, seed=int(cfg.seed), max_episode_steps=steps, terminations=terminations)


def owns(task):
	"""Returns whether `task` names a Gymnasium id (`gym:<id>`)."""
	return task.startswith(PREFIX)


def make_env(cfg):
	"""Makes the `gym:<id>` task of `cfg` (after importing cfg.env_module). Raises TaskError with one line."""
	task = str(cfg.task)
	env_id = task[len(PREFIX):]
	if not env_id:
		raise TaskError(f"task={task}: name a Gymnasium id after {PREFIX!r}, e.g. task=gym:Walker2d-v4")
	import_env_modules(cfg.get("env_module", None))
	return make_gymnasium(task, env_id, cfg)


FAMILY = Family(
	name="Gymnasium", names="gym:<id>, any registered Gymnasium environment (env_module=... imports its module)",
	owns=owns, make=make_env, missing=lambda: modules_missing("gymnasium") and "gymnasium is not installed: pip install gymnasium==0.29.1",
	example="gym:Pendulum-v1", install="nothing beyond requirements.txt (gymnasium 0.29.1); an environment's own package as it says")
