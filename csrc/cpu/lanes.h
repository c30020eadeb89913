// Row-block ("lane") CPU kernels of top-k gating: kLaneRows rows at a time, stored transposed
// (expert-major, x[j * kLaneRows + l] is expert j of the block's row l), so every step of the row
// code of gate_row.h runs on kLaneRows rows at once and the compiler vectorises across rows,
// whatever E is. Compiled once per instruction set (lanes_*.cpp); lane_kernels() picks the best
// one the running CPU supports.
#pragma once

#include <stdint.h>

namespace tdmpc2_moe {

// Rows per block: two AVX2 registers of floats. There is no AVX-512 build: it was no faster
// (benchmarks/README.md section 1).
constexpr int kLaneRows = 16;

struct LaneForward {
	const float* logits;  // [N, E] contiguous float32
	int64_t n;
	int e, k;
	float t;  // temperature
	bool renormalize;
	float* weights;  // [N, k]
	int64_t* indices;  // [N, k]
	float* lse;  // [N]
	// This thread's statistics, added to: sum over its rows of the probabilities [E], pick counts [E].
	double* prob_sum;
	int64_t* counts;
};

struct LaneBackward {
	const float* logits;  // [N, E] contiguous float32
	float* grad;  // [N, E] output
	// Gradients are read through their strides: autograd often hands over expanded ones (the gradient
	// of a sum has stride 0), which are then read in place instead of being copied first.
	const float* grad_weights;  // [N, k] at (row, column) strides gw_stride, or null (zero)
	const float* grad_prob_mean;  // [E] contiguous, zeros when the gradient is absent
	const float* grad_lse;  // [N] at stride glse_stride, or null (zero)
	int64_t gw_stride[2], glse_stride;
	const int64_t* indices;  // [N, k]
	int64_t n;
	int e, k;
	float t, inv_rows;
	bool renormalize;
};

struct LaneKernels {
	// Rows [begin, end) of the forward / backward.
	void (*forward)(const LaneForward&, int64_t begin, int64_t end);
	void (*backward)(const LaneBackward&, int64_t begin, int64_t end);
	const char* isa;
};

// The kernels of one instruction set (those not built on this platform are absent).
LaneKernels lane_kernels_generic();
#if defined(__x86_64__) && defined(__GNUC__)
LaneKernels lane_kernels_avx2();
#endif

// Returns the fastest kernels the running CPU supports (decided once).
const LaneKernels& lane_kernels();

}  // namespace tdmpc2_moe
