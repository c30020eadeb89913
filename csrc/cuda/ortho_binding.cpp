// CUDA dispatch glue of the orthonormalisation: argument checks, device guard, current stream, output
// and workspace allocation; the kernels are in ortho_kernels.cu. Compiled only in CUDA builds (setup.py).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../ortho_checks.h"
#include "../ortho_row.h"
#include "ortho_launch.h"

namespace tdmpc2_moe {
namespace {

at::Tensor run_cuda(const at::Tensor& features, const at::Tensor* grad, double eps) {
	const c10::cuda::CUDAGuard guard(features.device());
	// float64 is computed in float64, every other dtype in float32 (as on the CPU).
	const at::ScalarType compute = ortho_compute_dtype(features);
	const at::Tensor x = features.to(compute).contiguous();
	const at::Tensor g = grad ? grad->to(compute).contiguous() : at::Tensor();
	at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
	// The backward's gradients of the q_j, from the caching allocator on the current stream.
	const at::Tensor work = grad ? at::empty_like(x, at::MemoryFormat::Contiguous) : at::Tensor();
	OrthoParams p{};
	p.f64 = compute == at::kDouble;
	p.x = x.const_data_ptr();
	p.grad = grad ? g.const_data_ptr() : nullptr;
	p.out = out.data_ptr();
	p.work = grad ? work.data_ptr() : nullptr;
	p.n = x.size(1);
	p.e = static_cast<int>(x.size(0));
	p.d = static_cast<int>(x.size(2));
	p.eps2 = eps * eps;
	const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
	const cudaError_t err = grad ? launch_orthonormalize_backward(p, stream) : launch_orthonormalize(p, stream);
	TORCH_CHECK(err == cudaSuccess, "tdmpc2_moe CUDA kernel launch failed: ", cudaGetErrorString(err));
	return out.to(features.scalar_type());
}

at::Tensor orthonormalize_cuda(const at::Tensor& features, double eps) {
	check_ortho_args(features, eps);
	return run_cuda(features, nullptr, eps);
}

// The backward kernel keeps a row's 2 E^2 + 2 E coefficients in shared memory (48 KiB without opt-in).
constexpr size_t kCoefBytes = 48 * 1024;

at::Tensor orthonormalize_backward_cuda(const at::Tensor& grad, const at::Tensor& features, double eps) {
	check_ortho_backward_args(grad, features, eps);
	const size_t elem = ortho_compute_dtype(features) == at::kDouble ? sizeof(double) : sizeof(float);
	const int e = static_cast<int>(features.size(0));
	TORCH_CHECK_VALUE(static_cast<size_t>(ortho_coef_size(e)) * elem <= kCoefBytes, "features: n_experts E=", e,
			" is more than the CUDA backward supports (its coefficients must fit in ", kCoefBytes,
			" bytes of shared memory: E <= 77 in float32, 54 in float64)");
	return run_cuda(features, &grad, eps);
}

}  // namespace
}  // namespace tdmpc2_moe

TORCH_LIBRARY_IMPL(tdmpc2_moe, CUDA, m) {
	m.impl("orthonormalize", &tdmpc2_moe::orthonormalize_cuda);
	m.impl("orthonormalize_backward", &tdmpc2_moe::orthonormalize_backward_cuda);
}
