#!/usr/bin/env bash
# Sets up the venv and runs the test suite. Integration tests use the TD-MPC2 checkout named by
# TDMPC2_ROOT (or ~/tdmpc2 when it exists), the fork's tests the checkout named by FORK_ROOT (or
# ~/fork), the CUDA kernels on the SIMT emulator (tests/ops/test_cuda_emulated.py) the HIP-CPU checkout
# named by HIP_CPU_ROOT (or ~/hip-cpu), HumanoidBench's tasks the source tree named by HUMANOID_BENCH_ROOT (or
# ~/humanoid-bench; setup_venv.sh installs it), and are skipped with a reason otherwise. `-m ""` runs the
# tests marked slow too (the default `pytest` run, the quick loop, skips them: pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
export VENV=$(realpath -m "${VENV:-.venv}")
if [ -z "${HUMANOID_BENCH_ROOT:-}" ] && [ -f "$HOME/humanoid-bench/humanoid_bench/__init__.py" ]; then
	export HUMANOID_BENCH_ROOT="$HOME/humanoid-bench"
fi
bash scripts/setup_venv.sh
if [ -z "${TDMPC2_ROOT:-}" ] && [ -f "$HOME/tdmpc2/tdmpc2/tdmpc2.py" ]; then
	export TDMPC2_ROOT="$HOME/tdmpc2"
fi
if [ -z "${FORK_ROOT:-}" ] && [ -f "$HOME/fork/tdmpc2/Mooretdmpc.py" ]; then
	export FORK_ROOT="$HOME/fork"
fi
if [ -z "${HIP_CPU_ROOT:-}" ] && [ -f "$HOME/hip-cpu/include/hip/hip_runtime.h" ]; then
	export HIP_CPU_ROOT="$HOME/hip-cpu"
fi
echo "TDMPC2_ROOT=${TDMPC2_ROOT:-<unset: integration tests will be skipped>}"
echo "FORK_ROOT=${FORK_ROOT:-<unset: the tests against the fork code will be skipped>}"
echo "HIP_CPU_ROOT=${HIP_CPU_ROOT:-<unset: the CUDA kernels on the SIMT emulator will be skipped>}"
echo "HUMANOID_BENCH_ROOT=${HUMANOID_BENCH_ROOT:-<unset: the HumanoidBench tasks will be skipped>}"
export PATH="$VENV/bin:$PATH"
# Run from tests/ so the installed package (with its built _C), not the source tree, is imported.
cd tests && exec "$VENV/bin/python" -m pytest -q -rs -p no:cacheprovider -m "" "$@" .
