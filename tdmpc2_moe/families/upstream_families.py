"""
Upstream TD-MPC2's own task families (its `envs/*.py` at the pinned commit) as this layer sees them: their
names, what each needs installed and how to install it; upstream's code builds their environments
(`Family.make` is None). And the one fix they need through the patch (docs/design.md 21): upstream's
MyoSuite, Meta-World and ManiSkill `make_env` assign `env.max_episode_steps = ...` on its `Timeout`
wrapper, whose `max_episode_steps` is a read-only property, so every such task died with
AttributeError; `settable_max_episode_steps` is that property with a setter.

What runs here (measured, docs/task_families.md): DMC and Gymnasium MuJoCo with requirements.txt;
MyoSuite 2.5.0 with requirements-myosuite.txt. Meta-World and ManiSkill do not run at the pinned
commit with packages from the index: upstream imports Meta-World 2.x names (ALL_V2_ENVIRONMENTS_GOAL_OBSERVABLE,
the old gym API) that the index's 3.x no longer has, and 3.x needs gymnasium >= 1.1, which breaks
upstream's make_env (`gym.logger.set_level`); ManiSkill2 needs a Vulkan device, and its step returns five
values where upstream's wrapper unpacks four.
"""
import ctypes.util
import importlib

from .family import Family, modules_missing

# upstream envs/maniskill.py's task names (that module imports mani_skill2 at its top, so its table
# cannot be read where ManiSkill is missing).
MANISKILL_TASKS = ("lift-cube", "pick-cube", "stack-cube", "pick-ycb", "turn-faucet")
MYOSUITE_INSTALL = "pip install -r requirements-myosuite.txt && pip install --no-deps myosuite==2.5.0 (docs/task_families.md)"


def settable_max_episode_steps():
	"""Returns `Timeout.max_episode_steps` as a property that upstream's own `env.max_episode_steps = ...` can set."""
	def get(self):
		return self._max_episode_steps

	def set_(self, value):
		self._max_episode_steps = value
	return property(get, set_, doc="Steps after which an episode ends (settable: upstream's make_env functions assign it).")


def upstream_table(module, name):
	"""Returns the dict `name` of upstream's `envs.<module>` (the checkout must be on sys.path), or {} when it cannot be imported."""
	try:
		return getattr(importlib.import_module(f"envs.{module}"), name)
	except Exception:  # a family whose module fails to import owns no name
		return {}


def dmc_tasks():
	"""
	Returns upstream's names of DMC tasks (dm_control's suite and upstream's own): `domain-task`, which
	upstream's make_env reads by turning dashes into underscores and splitting at the first one
	(`cup`, `pointmass` for ball_in_cup, point_mass). () without dm_control.
	"""
	try:
		importlib.import_module("envs.dmcontrol")  # adds upstream's custom tasks to the suite
		from dm_control import suite
	except Exception:
		return ()
	short = {"ball_in_cup": "cup", "point_mass": "pointmass"}
	long = {v: k for k, v in short.items()}
	names = []
	for domain, task in suite.ALL_TASKS:
		name = f"{short.get(domain, domain)}-{task}".replace("_", "-")
		read_domain, read_task = name.replace("-", "_").split("_", 1)
		if (long.get(read_domain, read_domain), read_task) == (domain, task):
			names.append(name)
	return tuple(names)


def _metaworld_missing():
	if modules_missing("metaworld"):
		return ("Meta-World is not installed, and upstream's envs/metaworld.py needs Meta-World 2.x "
				"(ALL_V2_ENVIRONMENTS_GOAL_OBSERVABLE, the old gym API), which the package index does not have: its "
				"3.x needs gymnasium >= 1.1, which breaks upstream's make_env; not runnable at the pinned commit")
	return None


def _maniskill_missing():
	if modules_missing("mani_skill2"):
		return ("ManiSkill2 is not installed (pip install mani-skill2==0.5.3); it also needs a Vulkan device "
				"(libvulkan.so.1), and its step returns five values where upstream's wrapper unpacks four")
	if ctypes.util.find_library("vulkan") is None:
		return "ManiSkill2 needs a Vulkan device: libvulkan.so.1 is missing (apt-get install libvulkan1 and a GPU driver)"
	return None


DMC = Family(name="DMC", names="domain-task of the DeepMind Control suite, e.g. walker-walk",
			 owns=lambda task: task in dmc_tasks(), make=None,
			 missing=lambda: modules_missing("dm_control") and "dm-control is not installed: pip install dm-control==1.0.20",
			 example="walker-walk", install="requirements.txt (dm-control 1.0.20, mujoco 3.1.6)")
GYMNASIUM_MUJOCO = Family(name="Gymnasium MuJoCo", names="upstream's mujoco-walker, mujoco-halfcheetah, bipedal-walker, "
													   "lunarlander-continuous",
						  owns=lambda task: task in upstream_table("mujoco", "MUJOCO_TASKS"), make=None,
						  missing=lambda: modules_missing("mujoco") and "mujoco is not installed: pip install mujoco==3.1.6",
						  example="mujoco-halfcheetah", install="requirements.txt (Box2D for bipedal-walker and lunarlander-continuous)")
MYOSUITE = Family(name="MyoSuite", names="upstream's myo-*, e.g. myo-key-turn-hard",
				  owns=lambda task: task.startswith("myo-"), make=None,
				  missing=lambda: modules_missing("myosuite") and f"MyoSuite is not installed: {MYOSUITE_INSTALL}",
				  example="myo-key-turn-hard", install=MYOSUITE_INSTALL)
METAWORLD = Family(name="Meta-World", names="upstream's mw-*, e.g. mw-reach", owns=lambda task: task.startswith("mw-"),
				   make=None, missing=_metaworld_missing, example="mw-reach",
				   install="none from the package index works with upstream at the pinned commit")
MANISKILL = Family(name="ManiSkill", names=f"upstream's {', '.join(MANISKILL_TASKS)}",
				   owns=lambda task: task in MANISKILL_TASKS, make=None, missing=_maniskill_missing,
				   example="pick-cube", install="pip install mani-skill2==0.5.3 and a Vulkan device; upstream's wrapper "
												"does not fit its five-value step")
