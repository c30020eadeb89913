"""
`humanoid_<gym id>`: HumanoidBench (github.com/carlosferrazza/humanoid-bench) as TD-MPC2 tasks (docs/design.md 21),
named as the fork's and HumanoidBench's own TD-MPC2 copies name them (`humanoid_h1hand-run-v0`), so the
fork's sweeps, work_dirs and checkpoints keep their task names.

`import humanoid_bench` registers its environments with Gymnasium; each is then a Gymnasium task
(gymnasium_tasks.GymnasiumTask: float32 observations, the spec's 1000-step episodes, the first reset
seeded with cfg.seed). HumanoidBench builds an offscreen MuJoCo viewer even without rendering, so
MUJOCO_GL is set to egl unless the user chose one. A fall ends the episode; with `episodic=false` (the
default, as the fork and HumanoidBench's TD-MPC2 run it) it does not read as a termination, with
`episodic=true` it does and upstream's termination head learns it.

HumanoidBench is not on the package index and needs mujoco >= 3.1.6 (its models use
`MjModel.jnt_actgravcomp`) and jax (`import humanoid_bench` imports `jax.numpy`): docs/task_families.md.
"""
import atexit
import os

from .family import Family, TaskError, closest, modules_missing
from .gymnasium_tasks import make_gymnasium

PREFIX = "humanoid_"
# mujoco releases before this lack MjModel.jnt_actgravcomp, which HumanoidBench's models set.
MUJOCO_NEEDED = (3, 1, 6)
INSTALL = ("git clone https://github.com/carlosferrazza/humanoid-bench && pip install -r requirements-humanoid-bench.txt "
		   "&& pip install --no-deps -e humanoid-bench (docs/task_families.md)")


def missing():
	"""Returns why HumanoidBench cannot run here (one line with the fix), or None when it can."""
	import importlib.metadata
	absent = modules_missing("jax", "humanoid_bench")
	if absent == "jax":
		return f"HumanoidBench needs jax (import humanoid_bench imports jax.numpy), which is not installed: {INSTALL}"
	if absent:
		return f"HumanoidBench is not installed (no module humanoid_bench; it is not on the package index): {INSTALL}"
	version = importlib.metadata.version("mujoco")
	have = tuple(int(p) for p in version.split(".")[:3] if p.isdigit())
	if have < MUJOCO_NEEDED:
		return (f"HumanoidBench needs mujoco >= 3.1.6 (mujoco {version} has no MjModel.jnt_actgravcomp): "
				"pip install mujoco==3.1.6 dm-control==1.0.20")
	return None


def registered_ids():
	"""Returns the Gymnasium ids HumanoidBench registers (imports humanoid_bench)."""
	import gymnasium as gym
	import humanoid_bench  # noqa: F401  (registers its environments)
	return sorted(i for i, spec in gym.registry.items() if str(spec.entry_point).startswith("humanoid_bench"))


def owns(task):
	"""Returns whether `task` names a HumanoidBench task (`humanoid_<gym id>`)."""
	return task.startswith(PREFIX)


def make_env(cfg):
	"""Makes the HumanoidBench task of `cfg`. Raises TaskError with one line (not installed, unknown id, obs=rgb)."""
	task = str(cfg.task)
	why = missing()
	if why:
		raise TaskError(f"task={task}: {why}")
	os.environ.setdefault("MUJOCO_GL", "egl")
	env_id = task[len(PREFIX):]
	ids = registered_ids()
	if env_id not in ids:
		raise TaskError(f"task={task}: HumanoidBench has no environment {env_id!r}"
						f"{closest(env_id, ids) or f' (it has {len(ids)}, e.g. {ids[:3]})'}")
	env = make_gymnasium(task, env_id, cfg, terminations=bool(cfg.get("episodic", False)))
	# HumanoidBench's offscreen viewer, freed by the garbage collector at exit, would outlive the EGL display
	# mujoco terminates in its own exit handler (a traceback after every run); handlers run last-in first-out.
	atexit.register(env.close)
	return env


FAMILY = Family(name="HumanoidBench", names="humanoid_<gym id>, e.g. humanoid_h1hand-run-v0", owns=owns, make=make_env,
				missing=missing, example="humanoid_h1hand-run-v0", install=INSTALL)
