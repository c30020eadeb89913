"""
The task families in one place (docs/design.md 21), in the order the patched `make_env` asks them: the
plugin's (their prefixes `humanoid_` and `gym:` begin no upstream name), then upstream's own.
"""
from . import gymnasium_tasks, humanoid_bench, upstream_families as upstream
from .family import modules_missing

FAMILIES = (humanoid_bench.FAMILY, gymnasium_tasks.FAMILY, upstream.DMC, upstream.GYMNASIUM_MUJOCO, upstream.MYOSUITE,
			upstream.METAWORLD, upstream.MANISKILL)


def family_of(task):
	"""Returns the Family whose names include `task`, or None for a name no family knows."""
	for family in FAMILIES:
		if family.owns(str(task)):
			return family
	return None


def known_tasks():
	"""Returns the task names this machine knows, for "closest" suggestions: upstream's tables and, when installed, HumanoidBench's."""
	names = list(upstream.dmc_tasks()) + list(upstream.upstream_table("mujoco", "MUJOCO_TASKS"))
	names += list(upstream.upstream_table("myosuite", "MYOSUITE_TASKS")) + list(upstream.MANISKILL_TASKS)
	if humanoid_bench.missing() is None:
		names += [humanoid_bench.PREFIX + i for i in humanoid_bench.registered_ids()]
	if not modules_missing("gymnasium"):
		import gymnasium as gym
		names += [gymnasium_tasks.PREFIX + i for i in gym.registry]
	return names
