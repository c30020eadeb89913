"""
The mechanics of reversible patching, independent of what is patched: a log of `setattr`s that
can be undone in reverse order, and an import hook that runs a patcher on a module right after it
executes (so patching may come before or after the module is imported). The table of patchers
(module name -> function) is handed in by `patching.py`; this module never imports it.
"""
import importlib.abc
import sys

_MISSING = object()


class SetattrLog:
	"""Records every `set(owner, name, value)` with the value it replaced, so `undo()` restores them all."""

	def __init__(self):
		self._entries = []

	def set(self, owner, name, value):
		"""Sets `owner.name = value`, remembering what `owner.__dict__` held there (or that it held nothing)."""
		self._entries.append((owner, name, owner.__dict__.get(name, _MISSING)))
		setattr(owner, name, value)

	def undo(self):
		"""Restores every recorded attribute, newest first (attributes that did not exist are deleted)."""
		for owner, name, original in reversed(self._entries):
			if original is _MISSING:
				delattr(owner, name)
			else:
				setattr(owner, name, original)
		self._entries.clear()

	def original(self, owner, name):
		"""Returns the object first replaced at `owner.name`, or the current one when it was never replaced."""
		for o, n, value in self._entries:
			if o is owner and n == name and value is not _MISSING:
				return value
		return getattr(owner, name)


class PatchOnImport(importlib.abc.MetaPathFinder):
	"""
	A `sys.meta_path` finder for the modules named in `patchers` ({module name: patcher(module)}):
	finds them with the other finders and wraps their loader so that the patcher runs right after
	the module executes, while `active()` is true.
	"""

	def __init__(self, patchers, active):
		self._patchers, self._active = patchers, active

	def find_spec(self, name, path, target=None):
		if name not in self._patchers:
			return None
		for finder in sys.meta_path:
			if finder is self or not hasattr(finder, "find_spec"):
				continue
			spec = finder.find_spec(name, path, target)
			if spec is not None and spec.loader is not None:
				spec.loader = _PatchingLoader(spec.loader, self._patchers[name], self._active)
				return spec
		return None

	def install(self):
		"""Puts the hook first on `sys.meta_path`."""
		sys.meta_path.insert(0, self)

	def remove(self):
		"""Takes the hook off `sys.meta_path`."""
		sys.meta_path.remove(self)


class _PatchingLoader(importlib.abc.Loader):
	def __init__(self, loader, patcher, active):
		self._loader, self._patcher, self._active = loader, patcher, active

	def create_module(self, spec):
		return self._loader.create_module(spec)

	def exec_module(self, module):
		self._loader.exec_module(module)
		if self._active():
			self._patcher(module)

	def __getattr__(self, name):
		return getattr(self._loader, name)
