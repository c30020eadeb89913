"""
Refuses to benchmark the plain-PyTorch reference under the name of the fused operator: when
`tdmpc2_moe.backend()` is "reference" (typically a source tree on sys.path without a built `_C`),
every figure of these suites would be the reference's, so the run stops before timing anything,
with a message that says how to get the compiled extension.
"""
import pytest


def pytest_configure(config):
	import tdmpc2_moe
	# Collecting times nothing (scripts/gpu_check.sh --dry-run collects before any build).
	if config.option.collectonly or tdmpc2_moe.backend() != "reference":
		return
	from tdmpc2_moe.ops import operators as ops
	pytest.exit(
		f"tdmpc2_moe.backend() is 'reference' ({ops.backend_reason()}; imported from "
		f"{tdmpc2_moe.__file__}): these benchmarks would time the reference as 'fused'. Install the package "
		"with its extension (`pip install --no-build-isolation .` from the repository root, or `pip install .` "
		"and import it once to compile it) and run the benchmarks from benchmarks/ without PYTHONPATH=.",
		returncode=3)
