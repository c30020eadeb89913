// Host entry points of the orthonormalisation's CUDA kernels (cuda/ortho_kernels.cu): raw pointers and
// a stream only, so the .cu needs no ATen/c10 header. cuda/binding_impl.h calls them.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

namespace tdmpc2_moe {

struct OrthoParams {
	bool f64;  // every tensor is float64 (else float32; other dtypes are converted by the caller)
	const void* x;  // features [E, N, D], contiguous
	const void* grad;  // backward: grad of q [E, N, D], contiguous; null in the forward
	void* out;  // forward: q; backward: grad of features [E, N, D]
	void* work;  // backward: the gradients of the q_j, [E, N, D]; null in the forward
	int64_t n;
	int e, d;
	double eps2;  // eps^2 (narrowed to float32 for float32 features)
};

// Enqueue the forward / backward on `stream` (no host synchronisation). Return the launch error.
cudaError_t launch_orthonormalize(const OrthoParams& p, cudaStream_t stream);
cudaError_t launch_orthonormalize_backward(const OrthoParams& p, cudaStream_t stream);

}  // namespace tdmpc2_moe
