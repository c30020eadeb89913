// Host entry points of the CUDA kernels (cuda/topk_gate.cu): raw pointers and a stream only, so the
// .cu needs no ATen/c10 header and compiles with plain nvcc. cuda/binding.cpp calls them.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

namespace tdmpc2_moe {

enum class GateDtype : int { kFloat32, kFloat16, kBFloat16 };

struct GateForwardParams {
	const void* logits;  // [n, e], contiguous (float64 logits are converted by the caller)
	GateDtype logits_dtype;
	int64_t n;
	int e, k;
	float temperature;
	bool renormalize;
	float* weights;  // [n, k]
	int64_t* indices;  // [n, k]
	float* prob_mean;  // [e]; the launcher fills it (no zeroing needed)
	float* frac;  // [e]; likewise
	float* lse;  // [n]
	void* ring;  // [capacity, e], contiguous, or null when not recording
	GateDtype ring_dtype;
	int64_t capacity;
	int64_t* cursor;  // device int64, advanced by n after the rows are written (null with ring null)
};

struct GateBackwardParams {
	const float* grad_weights;  // [n, k] or null (zero)
	const float* grad_prob_mean;  // [e] or null (zero)
	const float* grad_lse;  // [n] or null (zero)
	const void* logits;  // [n, e], contiguous
	GateDtype dtype;  // of logits and grad_logits
	const int64_t* indices;  // [n, k]
	int64_t n;
	int e, k;
	float temperature;
	bool renormalize;
	void* grad_logits;  // [n, e], contiguous
};

// Enqueue the forward / backward on `stream` (no host synchronisation, capturable in a CUDA graph).
// Return the launch error, cudaSuccess if none.
cudaError_t launch_topk_gate_forward(const GateForwardParams& p, cudaStream_t stream);
cudaError_t launch_topk_gate_backward(const GateBackwardParams& p, cudaStream_t stream);

}  // namespace tdmpc2_moe
