"""Argument checks shared by topk_gate, GateHistory, MoEBlock, MemoryMonitor and patch(): each raises a
ValueError that names the argument."""
import math

# MoEBlock's dispatch modes (dispatch.py). Named here, with the checks, so that settings.py can validate
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
