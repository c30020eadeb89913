// The deliberately wrong kernels of negative_controls.cpp: blocks of 64 threads, x and out [blocks * 64]
// (float_atomics adds into out[0]; divergent_barrier reads no x).
#pragma once

namespace tdmpc2_moe_emu_controls {

enum class Control : int { kMissingBarrier = 0, kFloatAtomics = 1, kDivergentBarrier = 2 };

void run(Control which, const float* x, float* out, int blocks);

}  // namespace tdmpc2_moe_emu_controls
