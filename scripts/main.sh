#!/usr/bin/env bash
# The main job: sets up the venv, prints a short gating benchmark table, then trains TD-MPC2 with
# MoE heads when a checkout is available (TDMPC2_ROOT, ~/tdmpc2, or a clone at the pinned commit
# when the network allows), and otherwise runs `tdmpc2-moe demo`. Outputs land in out/.
set -euo pipefail
cd "$(dirname "$0")/.."
export VENV=$(realpath -m "${VENV:-.venv}")
bash scripts/setup_venv.sh
export PATH="$VENV/bin:$PATH"
PINNED=e9f59321933cbc8e11a002b842adc7d4ffae8ff1
OUT=$(realpath -m out)
mkdir -p "$OUT"

echo "== topk_gate: fused vs reference vs torch.compile(reference), N=512 E=8 k=2, and bandwidth"
(cd benchmarks && OMP_NUM_THREADS=1 python -m pytest -q -p no:cacheprovider test_gating.py \
	-k "N512-E8-k2 or bandwidth" --benchmark-json="$OUT/gating_quick.json" > "$OUT/gating_quick.log" \
	&& python test_gating.py "$OUT/gating_quick.json")

root=${TDMPC2_ROOT:-}
why="TDMPC2_ROOT is set"
if [ -z "$root" ] && [ -f "$HOME/tdmpc2/tdmpc2/tdmpc2.py" ]; then
	root="$HOME/tdmpc2"; why="found ~/tdmpc2"
fi
if [ -z "$root" ]; then
	if timeout 120 git clone -q https://github.com/nicklashansen/tdmpc2 "$OUT/tdmpc2" 2>/dev/null \
			&& git -C "$OUT/tdmpc2" checkout -q "$PINNED"; then
		root="$OUT/tdmpc2"; why="cloned upstream at $PINNED"
	else
		rm -rf "$OUT/tdmpc2"
	fi
fi

if [ -n "$root" ]; then
	device=$(python -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
	echo "== Training TD-MPC2 with MoE heads on $device ($why: $root)"
	cd "$OUT"
	# A short walker-walk run: model_size=1, 2,000 steps (1,000 random seed steps), reduced planning on CPU.
	extra=()
	if [ "$device" = cpu ]; then
		extra=(batch_size=64 num_samples=128 num_elites=16 num_pi_trajs=8 iterations=4)
		export OMP_NUM_THREADS=1
	fi
	exec tdmpc2-moe train --tdmpc2 "$root" task=walker-walk model_size=1 use_moe=true moe_experts=4 \
		moe_top_k=2 device=$device steps=2000 seed_steps=1000 eval_freq=1000 eval_episodes=1 \
		compile=false enable_wandb=false save_video=false monitor_mem_interval=500 "${extra[@]}"
else
	echo "== No TD-MPC2 checkout (TDMPC2_ROOT unset, no ~/tdmpc2, clone failed): running tdmpc2-moe demo instead"
	exec tdmpc2-moe demo --out "$OUT/demo"
fi
