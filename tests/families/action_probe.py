"""
A module a test's training run imports through `env_module` (as a lab's own module that registers its
environments would be): it records the extremes of every action Gymnasium's Humanoid-v4 receives to the
file $ACTION_PROBE_FILE, so the test sees the actions a real run applies after the gym: family's rescaling.
"""
import os

from gymnasium.envs.mujoco.humanoid_v4 import HumanoidEnv

_step = HumanoidEnv.step


def _recording_step(self, action):
	with open(os.environ["ACTION_PROBE_FILE"], "a") as f:
		f.write(f"{float(action.min())} {float(action.max())}\n")
	return _step(self, action)


HumanoidEnv.step = _recording_step
