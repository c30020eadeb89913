"""
What a task family is: a name rule, a factory, and what it needs installed (docs/design.md 21). The
shape of Gymnasium's own registry entries (an id, an entry point) and of upstream's `envs/*.py`
`make_env` functions, one per family; `registry.py` holds the list.
"""
import dataclasses
import difflib
import importlib.util
from typing import Callable, Optional


class TaskError(ValueError):
	"""A task that cannot run here (unknown name, missing package, a space TD-MPC2 cannot use); the message is one line."""


@dataclasses.dataclass(frozen=True)
class Family:
	"""
	One task family.
	- `name`, `names`: what it is called and its task names ("humanoid_<gym id>").
	- `owns(task)`: whether the task name is one of this family's.
	- `make(cfg)`: builds the environment in upstream's interface (reset() -> obs, step(a) -> obs,
	  reward, done, info with "terminated", `max_episode_steps`), or None when upstream's own code
	  builds it (the patched make_env then calls upstream's).
	- `missing()`: None when what the family needs is importable, else one line naming the package
	  and how to install it (or the system library it lacks).
	- `example`: a task of the family that `tdmpc2-moe doctor` makes to see whether it runs.
	- `install`: how to install it, for the docs and doctor.
	"""
	name: str
	names: str
	owns: Callable[[str], bool]
	make: Optional[Callable]
	missing: Callable[[], Optional[str]]
	example: str
	install: str


def modules_missing(*modules):
	"""Returns the first of `modules` (dotted names) that cannot be imported here, or None."""
	for module in modules:
		try:
			if importlib.util.find_spec(module) is None:
				return module
		except (ImportError, ValueError):  # a parent package that is absent or broken
			return module
	return None


def closest(name, candidates, n=5):
	"""Returns a `; closest: a, b, c` suffix with the `candidates` nearest to `name` (empty when none is near)."""
	near = difflib.get_close_matches(name, sorted(set(candidates)), n=n, cutoff=0.5)
	return f"; closest: {', '.join(near)}" if near else ""
