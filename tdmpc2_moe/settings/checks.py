"""
Argument checks shared by topk_gate, GateHistory, MoEBlock, MemoryMonitor and the settings record:
each raises a ValueError that names the argument (or config key) and returns the value normalised.

`check_int` and `check_number` check one value. The lower-case factories (`boolean`, `integer`,
`number`, `one_of`, `optional`, `bounds`, `names`) return such a check, `check(name, value)`, for a
field of the settings record (record.py), so that each setting states its validation once.
`first_line` is the one line of another error that the plugin's own one-line errors quote.
"""
import math
from collections.abc import Sequence

# MoEBlock's dispatch modes (block/dispatch.py). Named here, with the checks, so that record.py can validate
# `moe_dispatch` without importing the module layer.
DISPATCHES = ("auto", "dense", "sparse")


def check_int(name, value, low, high=None):
	"""Returns `value` when it is an int (not a bool) in low..high (no upper bound when `high` is None)."""
	if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
		bound = f"in {low}..{high}" if high is not None else f">= {low}"
		raise ValueError(f"{name} must be an int {bound}, got {value!r}")
	return value


def check_number(name, value, *, positive):
	"""Returns `value` as a float when it is a finite real number, > 0 if `positive` else >= 0."""
	if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
			or (value <= 0 if positive else value < 0):
		raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
	return float(value)


def first_line(exc, limit=None, empty=""):
	"""
	Returns the first line of `exc`'s message (`empty` when it has none), cut to `limit` characters:
	what a one-line error from the plugin quotes of an error raised under it.
	"""
	lines = str(exc).strip().splitlines()
	return (lines[0] if lines else empty)[:limit]


def _fail(name, expected, value):
	raise ValueError(f"{name} must be {expected}, got {value!r}")


def boolean(name, value):
	"""Returns `value` when it is True or False (not 1, not "true": a YAML boolean arrives as a bool)."""
	if not isinstance(value, bool):
		_fail(name, "true or false", value)
	return value


def integer(low, high=None):
	"""Returns a check for an int in low..high."""
	return lambda name, value: check_int(name, value, low, high)


def number(*, positive):
	"""Returns a check for a finite number, > 0 if `positive` else >= 0 (returned as float)."""
	return lambda name, value: check_number(name, value, positive=positive)


def one_of(*choices):
	"""Returns a check for one of `choices`."""
	def check(name, value):
		if value not in choices:
			_fail(name, f"one of {list(choices)}", value)
		return value
	return check


def optional(check):
	"""Returns `check` that also lets None through (None meaning "off" or "not set", as the field says)."""
	return lambda name, value: None if value is None else check(name, value)


def is_pair(value):
	"""Returns True for a sequence of two items that is not a string (a tuple, a list, OmegaConf's ListConfig)."""
	return isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2


def bounds(name, value):
	"""Returns `value` as a tuple (low, high) of finite numbers with 0 < low <= high."""
	if not is_pair(value):
		_fail(name, "[low, high] with 0 < low <= high", value)
	try:
		low, high = (check_number(name, v, positive=True) for v in value)
	except ValueError:
		_fail(name, "[low, high] with 0 < low <= high", value)
	if low > high:
		_fail(name, "[low, high] with 0 < low <= high", value)
	return low, high


def _listed(name, value, expected):
	"""Returns the items of `value`, a list (any iterable) or one comma-separated string, as a tuple; `expected` names it in the error."""
	if isinstance(value, str):
		value = [v.strip() for v in value.split(",") if v.strip()]
	try:
		return tuple(value)
	except TypeError:
		_fail(name, expected, value)


def names(allowed=None, *, unique=False):
	"""
	Returns a check for a list of strings (or one comma-separated string), returned as a tuple (without
	repeats when `unique`); with `allowed`, every name must be one of them.
	"""
	def check(name, value):
		items = _listed(name, value, "a list of strings")
		if not all(isinstance(n, str) for n in items):
			_fail(name, "a list of strings", value)
		for item in items:
			if allowed is not None and item not in allowed:
				raise ValueError(f"{name}: unknown name {item!r}; choose from {list(allowed)}")
		return tuple(dict.fromkeys(items)) if unique else items
	return check


def gpu_ids(name, value):
	"""Returns `value` (a list of GPU indices >= 0, or one comma-separated string of them) as a tuple of ints."""
	ids = []
	for item in _listed(name, value, "a list of GPU indices (ints >= 0)"):
		if isinstance(item, str) and item.isdigit():
			item = int(item)
		if isinstance(item, bool) or not isinstance(item, int) or item < 0:
			_fail(name, "a list of GPU indices (ints >= 0)", value)
		ids.append(item)
	if not ids:
		_fail(name, "null or a non-empty list of GPU indices", value)
	return tuple(ids)
