#!/usr/bin/env bash
# Compiles every csrc/cuda/*.cu for sm_80 and sm_90 with `-Xptxas -v` and fails on a compile error
# or on any register spill (nonzero "spill stores" / "spill loads" in ptxas's report).
# Usage: scripts/check_nvcc.sh   (needs nvcc on PATH; the .cu files include no torch headers)
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
status=0
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
exit $status
