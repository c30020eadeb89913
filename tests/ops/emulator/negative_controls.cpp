// Three deliberately wrong kernels, run on the same emulator as the shipped ones, so that the tests can
// show that the racecheck-like pass and the divergence check would catch such bugs in csrc/cuda/*.cu:
//   missing_barrier: threads read a neighbour's shared-memory value without a __syncthreads between
//     the write and the read: the result depends on the order the block's threads run in.
//   float_atomics: blocks add their partial sums into one float with atomicAdd, the pattern the
//     statistics avoid: the bits of the sum depend on the order the blocks finish in.
//   divergent_barrier: half a warp reaches one more __syncthreads than the rest of the block.
// Exposed as tdmpc2_moe_emu::negative_control (emulated_ops.cpp).
#include "negative_controls.h"

#include "tdmpc2_simt_emulator.h"

namespace tdmpc2_moe_emu_controls {
namespace {

constexpr int kThreads = 64;

__global__ void missing_barrier(const float* x, float* out) {
	__shared__ float v[kThreads];
	const int t = threadIdx.x;
	const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + t;
	v[t] = x[i];
	out[i] = v[t] + v[(t + 1) % kThreads];  // the bug: no __syncthreads() before reading v[t + 1]
}

__global__ void float_atomics(const float* x, float* out) {
	if (threadIdx.x != 0) return;
	float s = 0.f;
	for (int j = 0; j < kThreads; ++j) s += x[static_cast<int64_t>(blockIdx.x) * kThreads + j];
	atomicAdd(out, s);  // the bug: the order of the blocks' additions decides the rounding
}

__global__ void divergent_barrier(float* out) {
	if (threadIdx.x < 16) __syncthreads();  // the bug: a barrier that not every thread reaches
	__syncthreads();
	out[static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x] = 1.f;
}

}  // namespace

void run(Control which, const float* x, float* out, int blocks) {
	switch (which) {
		case Control::kMissingBarrier: TDMPC2_LAUNCH(blocks, kThreads, 0, nullptr, missing_barrier)(x, out); break;
		case Control::kFloatAtomics: TDMPC2_LAUNCH(blocks, kThreads, 0, nullptr, float_atomics)(x, out); break;
		case Control::kDivergentBarrier: TDMPC2_LAUNCH(blocks, kThreads, 0, nullptr, divergent_barrier)(out); break;
	}
}

}  // namespace tdmpc2_moe_emu_controls
