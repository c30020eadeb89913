#!/usr/bin/env bash
# The one command for a machine with an NVIDIA GPU and its own torch (docs/design.md 10). Run from anywhere:
#   scripts/gpu_check.sh            # everything, results under $OUT (default: ./gpu_check_out)
#   scripts/gpu_check.sh --dry-run  # no GPU needed: checks every step's inputs and prints its command
# Steps: build the CUDA extension in place against the torch already installed (no pip, no network);
# the device-parametrised and CUDA-only tests on cuda; compute-sanitizer memcheck, racecheck and
# synccheck on a small workload; CUDA-graph capture and replay of forward + history + backward; the
# gating / MoEBlock / update benchmarks on cuda; 4 tiny TD-MPC2 runs packed on the GPU by Ray; two
# deterministic=true CUDA runs that must be equal. Each step has a time limit (the whole run stays under
# 10 minutes on one H100: GPU_CHECK_BUDGET) and a failed step does not stop the others; $OUT/summary.txt lists each
# step's result and the exit status is nonzero if any step failed. At most 8 files are written to $OUT.
# Environment: PYTHON (default python3), OUT, GPU_CHECK_BUDGET (seconds for the whole run, default 570),
# TDMPC2_ROOT (a TD-MPC2 checkout, for the update benchmark).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
PY=${PYTHON:-python3}
OUT=${OUT:-$ROOT/gpu_check_out}
mkdir -p "$OUT"
SUMMARY=$OUT/summary.txt
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
: >"$SUMMARY"
FAILED=0
BUDGET=${GPU_CHECK_BUDGET:-570}
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

note() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME SECONDS LOG CHECK -- COMMAND...: runs COMMAND (or, with --dry-run, runs CHECK: a command that
# verifies the step's inputs without a GPU) with a time limit, appending its output to LOG.
step() {
	local name=$1 limit=$2 log=$3 check=$4
	shift 5
	local start=$SECONDS rc
	# The whole run stays inside BUDGET seconds: a step gets at most what is left.
	local left=$((BUDGET - SECONDS))
	if [ $DRY = 0 ] && [ $left -lt 15 ]; then
		note "FAIL  $name: not run, the ${BUDGET} s budget is spent"
		FAILED=1
		return
	fi
	[ $DRY = 0 ] && [ "$limit" -gt $left ] && limit=$left
	echo "=== $name: $*" >>"$log"
	if [ $DRY = 1 ]; then
		echo "would run ($limit s): $*" >>"$log"
		bash -o pipefail -c "$check" >>"$log" 2>&1
	else
		timeout "$limit" "$@" >>"$log" 2>&1
	fi
	rc=$?
	if [ $rc = 0 ]; then
		note "ok    $name ($((SECONDS - start)) s)"
	else
		note "FAIL  $name (exit $rc after $((SECONDS - start)) s; see $(basename "$log"))"
		FAILED=1
	fi
}

# The sanitizers' workload: forward + history + backward over both kernel paths (E <= 32 and E > 32),
# bf16 logits and ring, an empty batch, non-finite rows and a call with more rows than the ring.
cat >"$WORK/workload.py" <<'EOF'
import math
import os

import torch

from tdmpc2_moe import GateHistory, backend, topk_gate

device = os.environ.get("WORKLOAD_DEVICE", "cuda")
print("backend", backend(), "device", device)
torch.manual_seed(0)
for e, n, dtype in ((3, 300, torch.float32), (8, 1000, torch.bfloat16), (32, 257, torch.float32), (64, 700, torch.float32),
					(1024, 20, torch.float16)):
	history = GateHistory(256, e, device=device, dtype=dtype if dtype != torch.float32 else torch.float32)
	x = (torch.randn(n, e, device=device) * 3).to(dtype)
	x[0] = math.nan
	x[1] = -math.inf
	x[2, 0] = math.inf
	x.requires_grad_()
	for k in sorted({1, 2, e}):
		gate = topk_gate(x, k, temperature=0.7, history=history)
		(gate.weights.sum() + gate.expert_prob_mean.square().sum() + gate.lse.nan_to_num().sum()).backward()
	topk_gate(torch.empty(0, e, device=device), 1, history=history)
if device == "cuda":
	torch.cuda.synchronize()
print("workload done")
EOF

note "gpu_check $(date -u +%FT%TZ) dry_run=$DRY root=$ROOT"
if [ $DRY = 0 ]; then
	{ nvidia-smi; "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"; } >"$OUT/build.log" 2>&1 \
		|| { note "FAIL  no usable GPU (nvidia-smi / torch.cuda)"; cat "$OUT/build.log"; exit 1; }
	# Only the GPU at hand's architecture: a shorter build.
	TORCH_CUDA_ARCH_LIST=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
	export TORCH_CUDA_ARCH_LIST
	note "GPU: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1), arch $TORCH_CUDA_ARCH_LIST"
else
	: >"$OUT/build.log"
fi

# 1. Build in place (setup.py picks CUDAExtension with TDMPC2_MOE_CUDA=1), then insist on backend() == "cuda".
step build 240 "$OUT/build.log" "test -f setup.py && ls csrc/cuda/*.cu csrc/cuda/*.cpp && $PY -c 'import setuptools, torch.utils.cpp_extension'" -- \
	env TDMPC2_MOE_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} "$PY" setup.py build_ext --inplace
step backend 30 "$OUT/build.log" "$PY -c 'import tdmpc2_moe'" -- \
	"$PY" -c "import tdmpc2_moe, sys; b = tdmpc2_moe.backend(); print('backend', b); sys.exit(b != 'cuda')"

# 1b. The kernels' self-check on the GPU (tdmpc2_moe/ops/kernel_check.py): every case against the reference there.
step self_check 60 "$OUT/build.log" "$PY -c 'import tdmpc2_moe.ops.kernel_check'" -- \
	"$PY" -c "import tdmpc2_moe; print(tdmpc2_moe.self_check('cuda'))"

# 2. Tests: the op / history / row-path / CUDA-only suites (cuda variants run here) and the nvcc check.
TESTS="ops/test_ops.py block/test_history.py ops/test_gpu_row_path.py ops/test_cuda.py block/test_moe_block.py ops/test_nvcc.py ops/test_self_check.py"
step tests 150 "$OUT/tests.log" "cd tests && $PY -m pytest -q -m \"\" --collect-only -p no:cacheprovider $TESTS | tail -1" -- \
	bash -c "cd tests && $PY -m pytest -q -rs -m \"\" -p no:cacheprovider $TESTS"
step cuda_graph 60 "$OUT/tests.log" "cd tests && $PY -m pytest -q -m \"\" --collect-only -p no:cacheprovider ops/test_cuda.py -k graph | grep -c graph" -- \
	bash -c "cd tests && $PY -m pytest -q -rs -m \"\" -p no:cacheprovider ops/test_cuda.py -k 'graph or stream or compile'"

# 3. compute-sanitizer on the small workload (the caching allocator off, so out-of-bounds accesses are
# not hidden inside a larger cached block).
# The dry run runs the workload once on the CPU.
for tool in memcheck racecheck synccheck; do
	check="$PY -m py_compile $WORK/workload.py"
	[ $tool = memcheck ] && check="WORKLOAD_DEVICE=cpu $PY $WORK/workload.py"
	step "sanitizer_$tool" 90 "$OUT/sanitizer.log" "$check" -- \
		env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" --error-exitcode 1 "$PY" "$WORK/workload.py"
done

# 4. Benchmarks on cuda. The gating subset: TD-MPC2 sizes, the bandwidth cases and the autograd path.
BENCH="--benchmark-max-time=0.1 --benchmark-min-rounds=10 -p no:cacheprovider -q"
GATING="-k 'N512-E8 or N1536-E8 or N1536-E64 or N8192-E64 or bandwidth or autograd_path'"
step bench_gating 150 "$OUT/bench.log" "TDMPC2_MOE_BENCH_DEVICE=cuda $PY -m pytest --collect-only -q -p no:cacheprovider benchmarks/test_gating.py $GATING | tail -1" -- \
	bash -c "TDMPC2_MOE_BENCH_DEVICE=cuda $PY -m pytest benchmarks/test_gating.py $GATING $BENCH --benchmark-json=$OUT/gating.json && $PY benchmarks/test_gating.py $OUT/gating.json"
for suite in moe_block update; do
	if ! grep -q TDMPC2_MOE_BENCH_DEVICE "benchmarks/test_$suite.py"; then
		note "SKIP  bench_$suite: benchmarks/test_$suite.py has no device option (TDMPC2_MOE_BENCH_DEVICE) yet; it would time the CPU"
		continue
	fi
	step "bench_$suite" 120 "$OUT/bench.log" "$PY -m pytest --collect-only -q -p no:cacheprovider benchmarks/test_$suite.py | tail -1" -- \
		bash -c "TDMPC2_MOE_BENCH_DEVICE=cuda UPDATE_BENCH_ROUNDS=${UPDATE_BENCH_ROUNDS:-50} $PY -m pytest benchmarks/test_$suite.py $BENCH --benchmark-json=$OUT/$suite.json"
done

# 5. Training on the GPU through upstream TD-MPC2 (needs TDMPC2_ROOT, upstream's packages and the sweep
# extra; skipped without them). packed_sweep: 4 tiny runs packed on one GPU by Ray (num_gpus=0.25 each);
# every run must have trained on cuda, all on the same GPU, with Ray's fraction recorded and the runs
# overlapping in time.
TINY="task=walker-walk steps=510 seed_steps=500 eval_freq=100000 eval_episodes=1 enable_wandb=false compile=false save_video=false model_size=1 batch_size=4 mpc=false monitor_mem_interval=0"
cat >"$WORK/check_packed.py" <<'PY'
"""Checks a packed sweep's files: every run on cuda, one GPU for all, Ray's 0.25 of it each, running at once."""
import glob, json, sys
runs = [json.load(open(p)) for p in glob.glob(sys.argv[1] + "/logs/*/*/*/run.json")]
jobs = [json.load(open(p)) for p in glob.glob(sys.argv[1] + "/multirun/*/*/*/tdmpc2_moe_job.json")]
print("runs", [(r["device"], r["cuda_visible_devices"], r.get("gpu_name")) for r in runs])
print("jobs", [(j["status"], j["ray_resources"], round(j["ended"] - j["started"], 1)) for j in jobs])
assert len(runs) == len(jobs) == 4 and all(j["status"] == "finished" for j in jobs)
assert all(r["device"].startswith("cuda") for r in runs) and len({r["cuda_visible_devices"] for r in runs}) == 1
assert all(j["ray_resources"].get("GPU") == 0.25 for j in jobs)
overlap = max(j["started"] for j in jobs) < min(j["ended"] for j in jobs)
print("all four running at once:", overlap)
assert overlap
print("packed sweep ok")
PY
if [ -z "${TDMPC2_ROOT:-}" ] || ! "$PY" -c "import hydra_plugins.hydra_ray_launcher, dm_control" 2>/dev/null; then
	note "SKIP  packed_sweep: needs TDMPC2_ROOT (a TD-MPC2 checkout), dm_control and hydra-ray-launcher (pip install .[sweep])"
else
	mkdir -p "$WORK/packed"
	step packed_sweep 150 "$OUT/bench.log" "$PY -m py_compile $WORK/check_packed.py && ls $TDMPC2_ROOT >/dev/null" -- \
		bash -c "cd $WORK/packed && $PY -m tdmpc2_moe train --tdmpc2 $TDMPC2_ROOT -m $TINY seed=1,2,3,4 hydra/launcher=ray hydra.launcher.ray.init.num_gpus=1 hydra.launcher.ray.init.include_dashboard=false hydra.launcher.ray.remote.num_gpus=0.25 && $PY $WORK/check_packed.py $WORK/packed"
fi

# deterministic_runs: the same short CUDA run twice with deterministic=true (one after the other, fresh
# processes): eval.csv and the final parameters must be equal to the bit.
cat >"$WORK/check_same_runs.py" <<'PY'
"""Checks that two runs' eval.csv are equal and their models/final.pt bit-identical."""
import pathlib, sys, torch
a, b = (pathlib.Path(p) for p in sys.argv[1:3])
assert (a / "eval.csv").read_text() == (b / "eval.csv").read_text(), "eval.csv differs"
ma, mb = (torch.load(p / "models" / "final.pt", weights_only=True)["model"] for p in (a, b))
differ = [k for k, v in ma.items() if isinstance(v, torch.Tensor) and not torch.equal(v, mb[k])]
print("eval.csv equal;", len(differ), "of", len(ma), "parameters differ", differ[:5])
assert not differ
PY
if [ -z "${TDMPC2_ROOT:-}" ] || ! "$PY" -c "import dm_control, hydra" 2>/dev/null; then
	note "SKIP  deterministic_runs: needs TDMPC2_ROOT (a TD-MPC2 checkout) and upstream's packages"
else
	DET="task=cartpole-balance seed=3 steps=1000 eval_freq=500 seed_steps=500 compile=false model_size=1 batch_size=64 num_samples=64 num_elites=8 num_pi_trajs=8 iterations=2 eval_episodes=1 enable_wandb=false save_video=false save_agent=true use_moe=true moe_dispatch=sparse deterministic=true exp_name=det"
	mkdir -p "$WORK/det_a" "$WORK/det_b"
	step deterministic_runs 200 "$OUT/bench.log" "$PY -m py_compile $WORK/check_same_runs.py && ls $TDMPC2_ROOT >/dev/null" -- \
		bash -c "for d in det_a det_b; do (cd $WORK/\$d && $PY -m tdmpc2_moe train --tdmpc2 $TDMPC2_ROOT $DET) || exit 1; done && $PY $WORK/check_same_runs.py $WORK/det_a/logs/cartpole-balance/3/det $WORK/det_b/logs/cartpole-balance/3/det"
fi

note "result: $([ $FAILED = 0 ] && echo all steps passed || echo some steps FAILED)"
exit $FAILED
