#!/usr/bin/env bash
# Creates (or reuses) the virtual environment $VENV (default .venv), installs torch==2.13.0 first,
# then the pinned requirements, then builds and installs tdmpc2_moe without build isolation. The task
# families' packages (docs/task_families.md): MyoSuite always (from the package index), HumanoidBench when
# $HUMANOID_BENCH_ROOT names its source tree (it is not on the index; scripts/test.sh finds ~/humanoid-bench).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(realpath -m "${VENV:-.venv}")
if [ ! -x "$VENV/bin/python" ]; then
	python3 -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
$PIP install -q torch==2.13.0
$PIP install -q -r requirements.txt
$PIP install -q -r requirements-myosuite.txt
$PIP install -q --no-deps myosuite==2.5.0
if [ -n "${HUMANOID_BENCH_ROOT:-}" ]; then
	$PIP install -q -r requirements-humanoid-bench.txt
	$PIP install -q --no-deps -e "$HUMANOID_BENCH_ROOT"
fi
$PIP install -q --no-build-isolation .
# From outside the source tree, so the installed package (with its built _C) is the one imported.
(cd / && "$VENV/bin/python" -c "import tdmpc2_moe; print('tdmpc2_moe backend:', tdmpc2_moe.backend())")
