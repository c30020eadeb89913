#!/usr/bin/env bash
# Compiles every csrc/cuda/*.cu (top-k gating, orthonormalisation, routed experts) for sm_80 and sm_90
# with `-Xptxas -v` and fails on a compile error or on any register spill (nonzero "spill stores" /
# "spill loads" in ptxas's report). Also fails when a .cu (or a header it includes from csrc/) includes
# an ATen / c10 / torch header: the kernels take raw pointers and a cudaStream_t, so they build with
# plain nvcc and against a torch wheel that lacks CUDA headers. When $PYTHON (default python3) imports
# torch, each csrc/cuda/*.cpp is also syntax-checked against that torch's headers (CPU wheels lack one
# generated c10/cuda header, which is then stubbed).
# Usage: scripts/check_nvcc.sh   (needs nvcc on PATH)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
status=0
if grep -nE '#include *[<"](ATen|c10|torch)/' csrc/cuda/*.cu csrc/cuda/*.h csrc/*_row.h csrc/expert_act.h; then
	echo "FAIL csrc/cuda/*.cu: includes ATen/c10/torch headers (above)"; status=1
fi
for cu in csrc/cuda/*.cu; do
	for arch in sm_80 sm_90; do
		log="$out/$(basename "$cu" .cu).$arch.log"
		if ! nvcc -c -O3 -std=c++17 -arch="$arch" -Xptxas -v "$cu" -o "$out/$(basename "$cu" .cu).$arch.o" >"$log" 2>&1; then
			echo "FAIL $cu ($arch): compile error"; cat "$log"; status=1; continue
		fi
		spills=$(grep -E "[1-9][0-9]* bytes spill (stores|loads)" "$log" || true)
		if [ -n "$spills" ]; then
			echo "FAIL $cu ($arch): register spills"; grep -B2 -E "[1-9][0-9]* bytes spill" "$log"; status=1
		else
			echo "ok   $cu ($arch): $(grep -c 'spill stores' "$log") kernels, no spills"
		fi
	done
done
if inc=$("$PY" -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'include'))" 2>/dev/null); then
	cuda_inc=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")/include
	[ -f "$cuda_inc/cuda_runtime.h" ] || cuda_inc=${CUDA_HOME:-/usr/local/cuda}/include
	mkdir -p "$out/stub/c10/cuda/impl"
	[ -f "$inc/c10/cuda/impl/cuda_cmake_macros.h" ] || echo "#pragma once" >"$out/stub/c10/cuda/impl/cuda_cmake_macros.h"
	pyinc=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
	for cpp in csrc/cuda/*.cpp; do
		if g++ -std=c++20 -fsyntax-only -DTDMPC2_MOE_WITH_CUDA=1 -I"$out/stub" -I"$inc" -I"$inc/torch/csrc/api/include" \
				-I"$cuda_inc" -I"$pyinc" "$cpp" >"$out/binding.log" 2>&1; then
			echo "ok   $cpp: compiles against torch $("$PY" -c 'import torch; print(torch.__version__)') headers"
		else
			echo "FAIL $cpp"; cat "$out/binding.log"; status=1
		fi
	done
else
	echo "skip csrc/cuda/*.cpp: $PY cannot import torch"
fi
exit $status
