"""
The `gym:<id>` family's adapter on real Gymnasium environments (families/gymnasium_tasks.py): actions
rescaled to the environment's bounds (checked on the controls MuJoCo applies), float32 observations,
episode ends and terminations, seeding, and each space or setting TD-MPC2 cannot use refused with one line.
No TD-MPC2 checkout needed.
"""
import gymnasium as gym
import numpy as np
import pytest

from tdmpc2_moe.families.family import TaskError
from tdmpc2_moe.families.gymnasium_tasks import GymnasiumTask, import_env_modules, make_gymnasium


class Cfg(dict):
	"""The part of a parsed upstream cfg a family reads: attributes and `get`."""
	__getattr__ = dict.__getitem__


def cfg(**keys):
	return Cfg({"seed": 1, "obs": "state", "episodic": True, **keys})


class DictObservations(gym.Env):
	observation_space = gym.spaces.Dict({"pos": gym.spaces.Box(-1, 1, (2,)), "vel": gym.spaces.Box(-1, 1, (2,))})
	action_space = gym.spaces.Box(-1, 1, (1,))


class ImageObservations(gym.Env):
	observation_space = gym.spaces.Box(0, 255, (3, 8, 8), dtype=np.uint8)
	action_space = gym.spaces.Box(-1, 1, (1,))


class UnboundedActions(gym.Env):
	observation_space = gym.spaces.Box(-1, 1, (3,))
	action_space = gym.spaces.Box(-np.inf, np.inf, (2,))


for name, entry, steps in [("TestDictObs-v0", DictObservations, 10), ("TestImageObs-v0", ImageObservations, 10),
						   ("TestUnbounded-v0", UnboundedActions, 10), ("TestNoLimit-v0", UnboundedActions, None)]:
	if name not in gym.registry:
		gym.register(name, entry_point=entry, max_episode_steps=steps)


def one_line(exc_info):
	message = str(exc_info.value)
	assert "\n" not in message
	return message


def test_humanoid_actions_are_rescaled_to_its_bounds():
	# Humanoid-v4's actuators take +-0.4; TD-MPC2 plans in [-1, 1]. MuJoCo's data.ctrl is what is applied.
	task = make_gymnasium("gym:Humanoid-v4", "Humanoid-v4", cfg())
	assert task.rescaled
	assert (task.action_space.low.tolist(), task.action_space.high.tolist()) == ([-1.0] * 17, [1.0] * 17)
	obs = task.reset()
	assert obs.dtype == np.float32 and obs.shape == (376,) and task.max_episode_steps == 1000
	ctrl = task.unwrapped.data.ctrl
	for action, applied in [(1.0, 0.4), (-1.0, -0.4), (0.0, 0.0), (0.5, 0.2), (3.0, 0.4)]:
		task.step(np.full(17, action, dtype=np.float32))
		np.testing.assert_allclose(ctrl, applied, atol=1e-6)


def test_bounds_of_one_pass_through_unchanged():
	task = make_gymnasium("gym:Walker2d-v4", "Walker2d-v4", cfg())
	assert not task.rescaled
	task.reset()
	action = np.linspace(-1, 1, 6, dtype=np.float32)
	task.step(action)
	np.testing.assert_allclose(task.unwrapped.data.ctrl, action, atol=1e-6)


def test_a_fall_ends_the_episode_and_reads_as_a_termination_only_when_asked():
	for terminations in (True, False):
		task = make_gymnasium("gym:Hopper-v4", "Hopper-v4", cfg(), terminations=terminations)
		task.reset()
		for t in range(1000):
			_, reward, done, info = task.step(np.ones(3, dtype=np.float32))
			if done:
				break
		assert done and t < 999, "a hopper pushed at full force falls long before the time limit"
		assert info["terminated"] is terminations and isinstance(reward, float)


def test_the_first_reset_is_seeded_with_the_seed():
	first = [make_gymnasium("gym:Walker2d-v4", "Walker2d-v4", cfg(seed=3)).reset() for _ in range(2)]
	other = make_gymnasium("gym:Walker2d-v4", "Walker2d-v4", cfg(seed=4)).reset()
	np.testing.assert_array_equal(first[0], first[1])
	assert not np.array_equal(first[0], other)


@pytest.mark.parametrize("env_id, keys, expected", [
	("Walker2d-v4", dict(episodic=False), "ends episodes when it terminates (terminate_when_unhealthy): train it with episodic=true"),
	("Walker2d-v9", {}, "no Gymnasium environment 'Walker2d-v9' is registered"),
	("CartPole-v1", {}, "has Discrete actions: TD-MPC2 plans continuous actions"),
	("TestDictObs-v0", {}, "has Dict observations (pos, vel)"),
	("TestImageObs-v0", {}, "Box observations of shape (3, 8, 8)"),
	("TestUnbounded-v0", {}, "action bounds that are not finite"),
	("TestNoLimit-v0", {}, "registered without max_episode_steps"),
	("Walker2d-v4", dict(obs="rgb"), "supports obs=state only"),
])
def test_what_td_mpc2_cannot_use_is_refused_in_one_line(env_id, keys, expected):
	with pytest.raises(TaskError) as exc:
		make_gymnasium(f"gym:{env_id}", env_id, cfg(**keys))
	message = one_line(exc)
	assert expected in message and f"task=gym:{env_id}" in message, message


def test_an_unknown_id_lists_the_closest_registered_ones():
	with pytest.raises(TaskError) as exc:
		make_gymnasium("gym:Walker2d-v9", "Walker2d-v9", cfg())
	assert "closest: Walker2d-v4, Walker2d-v3, Walker2d-v2" in one_line(exc)


def test_env_module_is_imported_and_a_missing_one_named():
	import_env_modules("json, math")
	with pytest.raises(TaskError) as exc:
		import_env_modules(["no_such_lab.envs"])
	assert one_line(exc).startswith("env_module=no_such_lab.envs: cannot import it (ModuleNotFoundError")


def test_module_colon_id_imports_the_module_first():
	# Gymnasium's own "module:id" form: the module registers the id.
	task = make_gymnasium("gym:gymnasium.envs.classic_control:Pendulum-v1", "gymnasium.envs.classic_control:Pendulum-v1",
						  cfg())
	assert task.rescaled and task.max_episode_steps == 200  # Pendulum's torque is +-2
	assert isinstance(task, GymnasiumTask)
