"""
Multitask agents over any tasks (docs/design.md 21): `task=<name> tasks=[t1,t2,...]`. Upstream reads a
multitask run from its task-set table (`common.TASK_SET`: mt30, mt80) and its `parse_cfg` overwrites
`tasks` with that table's list (or [task]). The patched `parse_cfg` honours an explicit `tasks` list
instead: for the call it enters `task` into the table with that list, so that upstream derives
everything else as for its own sets (`multitask`, `tasks`, `task_dim`, the task embedding, per-task
action masks and episode lengths, MultitaskWrapper's padding). Tasks may be of any family and of any
observation and action sizes (upstream pads to the largest). Upstream trains multitask agents offline
only; runs/multitask_online.py trains such a set online.
"""
import functools

from .family import TaskError

UPSTREAM_SETS = ("mt30", "mt80")


def explicit_tasks(cfg):
	"""Returns the task list `cfg` sets itself (`tasks=[...]`), or None when `tasks` is left to upstream (missing, `???`)."""
	from omegaconf import DictConfig, OmegaConf
	if isinstance(cfg, DictConfig):
		if "tasks" not in cfg or OmegaConf.is_missing(cfg, "tasks"):
			return None
		tasks = cfg.tasks
	else:
		tasks = getattr(cfg, "tasks", None)
	if tasks is None or tasks == "???":
		return None
	return tasks


def check_task_set(task, tasks):
	"""Returns `tasks` as a list of task names for the set `task`. Raises TaskError with one line."""
	if isinstance(tasks, str) or not all(isinstance(t, str) and t for t in tasks):
		raise TaskError(f"tasks must be a list of task names, e.g. tasks=[gym:Walker2d-v4,gym:Hopper-v4], got {tasks!r}")
	tasks = list(tasks)
	if len(tasks) < 2 or len(set(tasks)) != len(tasks):
		raise TaskError(f"tasks must name two or more different tasks (a multitask agent over them), got {tasks}")
	if task in UPSTREAM_SETS:
		raise TaskError(f"task={task} is upstream's own task set; tasks=[...] makes a set of your own: give it another "
						"name (task=<name>)")
	if task in tasks:
		raise TaskError(f"task={task} names the task set: it cannot also be one of its tasks {tasks}")
	return tasks


def patched_parse_cfg(upstream_parse_cfg, task_set_table):
	"""Returns upstream's `common.parser.parse_cfg` that honours an explicit `tasks` list (the module docstring)."""
	@functools.wraps(upstream_parse_cfg)
	def parse_cfg(cfg):
		tasks = explicit_tasks(cfg)
		if tasks is None or str(cfg.task) in UPSTREAM_SETS and list(tasks) == task_set_table[str(cfg.task)]:
			return upstream_parse_cfg(cfg)
		name = str(cfg.task)
		task_set_table[name] = check_task_set(name, tasks)
		try:
			return upstream_parse_cfg(cfg)
		finally:
			del task_set_table[name]
	return parse_cfg


def is_custom_set(cfg):
	"""Returns whether parsed `cfg` is a multitask agent over a task set of the user's (not upstream's mt30/mt80)."""
	return bool(cfg.get("multitask", False)) and str(cfg.task) not in UPSTREAM_SETS
