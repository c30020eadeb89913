// Host entry points of the CUDA kernels (cuda/topk_gate.cu): raw pointers and a stream only, so the
// .cu needs no ATen/c10 header and compiles with plain nvcc. cuda/binding_impl.h calls them.
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
	float* prob_mean;  // [e]; written by the kernel (no zeroing needed)
	float* frac;  // [e]; likewise
	float* lse;  // [n]
	void* ring;  // [capacity, e], contiguous, or null when not recording
	GateDtype ring_dtype;
	int64_t capacity;
	int64_t* cursor;  // device int64, advanced by n after the rows are written (null with ring null)
	// Workspace of topk_gate_forward_blocks(n, e) blocks: per-block statistics [blocks, e] (summed by the
	// last block to finish, in block order) and the ticket that finds that block (zeroed by the launcher).
	float* part_prob;
	unsigned* part_count;
	unsigned* ticket;
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

// Blocks the forward kernel runs for n rows of e experts (its workspace is sized by it).
int topk_gate_forward_blocks(int64_t n, int e);

// Enqueue the forward / backward on `stream` (no host synchronisation, capturable in a CUDA graph).
// Return the launch error, cudaSuccess if none.
cudaError_t launch_topk_gate_forward(const GateForwardParams& p, cudaStream_t stream);
cudaError_t launch_topk_gate_backward(const GateBackwardParams& p, cudaStream_t stream);

}  // namespace tdmpc2_moe
