"""
The task families in one place (families/registry.py), what each needs (its `missing()` line names the
package and the install command), the settable `Timeout.max_episode_steps`, and the task-set checks of
`tasks=[...]` (families/task_sets.py). No TD-MPC2 checkout needed.
"""
import importlib.util

import pytest

from tdmpc2_moe.families import humanoid_bench, task_sets, upstream_families
from tdmpc2_moe.families.family import TaskError
from tdmpc2_moe.families.registry import FAMILIES, family_of


@pytest.mark.parametrize("task, family", [
	("humanoid_h1hand-run-v0", "HumanoidBench"), ("gym:Walker2d-v4", "Gymnasium"), ("gym:ALE/Pong-v5", "Gymnasium"),
	("myo-key-turn-hard", "MyoSuite"), ("mw-reach", "Meta-World"), ("pick-cube", "ManiSkill"),
])
def test_each_name_rule_finds_its_family(task, family):
	assert family_of(task).name == family


def test_the_families_doctor_lists():
	assert [f.name for f in FAMILIES] == ["HumanoidBench", "Gymnasium", "DMC", "Gymnasium MuJoCo", "MyoSuite",
										  "Meta-World", "ManiSkill"]
	# DMC's and upstream MuJoCo's names are read from the checkout's tables (tests/runs/test_task_families.py).
	for family in FAMILIES:
		if family.name not in ("DMC", "Gymnasium MuJoCo"):
			assert family.owns(family.example), family.name


def test_a_missing_package_is_named_with_its_install_command(monkeypatch):
	absent = {"humanoid_bench", "myosuite", "mani_skill2", "metaworld"}
	real = importlib.util.find_spec
	monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in absent else real(name, *a))
	if importlib.util.find_spec("jax") is not None:
		why = humanoid_bench.missing()
		assert why.startswith("HumanoidBench is not installed (no module humanoid_bench; it is not on the package index)")
		assert "pip install -r requirements-humanoid-bench.txt && pip install --no-deps -e humanoid-bench" in why
	assert upstream_families.MYOSUITE.missing() == (
		"MyoSuite is not installed: pip install -r requirements-myosuite.txt && pip install --no-deps myosuite==2.5.0 "
		"(docs/task_families.md)")
	assert "pip install mani-skill2==0.5.3" in upstream_families.MANISKILL.missing()
	assert "not runnable at the pinned commit" in upstream_families.METAWORLD.missing()
	for family in FAMILIES:
		why = family.missing()
		assert why is None or "\n" not in why


def test_humanoid_bench_names_the_mujoco_it_needs(monkeypatch):
	import importlib.metadata
	if importlib.util.find_spec("jax") is None or importlib.util.find_spec("humanoid_bench") is None:
		pytest.skip("HumanoidBench is not installed here (requirements-humanoid-bench.txt)")
	real = importlib.metadata.version
	monkeypatch.setattr(importlib.metadata, "version", lambda name: "3.1.2" if name == "mujoco" else real(name))
	assert humanoid_bench.missing() == ("HumanoidBench needs mujoco >= 3.1.6 (mujoco 3.1.2 has no MjModel.jnt_actgravcomp): "
										"pip install mujoco==3.1.6 dm-control==1.0.20")


def test_timeout_episode_steps_can_be_assigned_as_upstream_does():
	class Timeout:  # upstream's envs/wrappers/timeout.py: a read-only property over _max_episode_steps
		def __init__(self, steps):
			self._max_episode_steps = steps

		@property
		def max_episode_steps(self):
			return self._max_episode_steps

	env = Timeout(100)
	with pytest.raises(AttributeError, match="has no setter"):
		env.max_episode_steps = env._max_episode_steps
	Timeout.max_episode_steps = upstream_families.settable_max_episode_steps()
	env.max_episode_steps = 250
	assert env.max_episode_steps == env._max_episode_steps == 250


@pytest.mark.parametrize("task, tasks, expected", [
	("pair", ["gym:Walker2d-v4"], "two or more different tasks"),
	("pair", ["gym:Walker2d-v4", "gym:Walker2d-v4"], "two or more different tasks"),
	("pair", "gym:Walker2d-v4", "must be a list of task names"),
	("mt30", ["walker-walk", "walker-run"], "task=mt30 is upstream's own task set"),
	("walker-walk", ["walker-walk", "walker-run"], "cannot also be one of its tasks"),
])
def test_a_task_set_that_cannot_be_is_refused_in_one_line(task, tasks, expected):
	with pytest.raises(TaskError, match=expected) as exc:
		task_sets.check_task_set(task, tasks)
	assert "\n" not in str(exc.value)
	assert task_sets.check_task_set("pair", ["gym:Walker2d-v4", "walker-walk"]) == ["gym:Walker2d-v4", "walker-walk"]


def test_a_task_set_enters_upstreams_table_for_the_parse_only():
	table = {"mt30": ["walker-walk"]}
	seen = {}

	def parse_cfg(cfg):  # stands in for upstream's: reads the table the way upstream's parse_cfg does
		seen.update(multitask=cfg["task"] in table, tasks=table.get(cfg["task"], [cfg["task"]]))
		return cfg

	class Cfg(dict):
		__getattr__ = dict.__getitem__
	patched = task_sets.patched_parse_cfg(parse_cfg, table)
	patched(Cfg(task="pair", tasks=["gym:Pendulum-v1", "gym:Reacher-v4"]))
	assert seen == {"multitask": True, "tasks": ["gym:Pendulum-v1", "gym:Reacher-v4"]}
	assert table == {"mt30": ["walker-walk"]}
	patched(Cfg(task="walker-walk", tasks=None))
	assert seen == {"multitask": False, "tasks": ["walker-walk"]}
