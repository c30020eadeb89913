// The CUDA operators from tensors to a kernel launch: argument checks, output allocation, the launchers'
// parameters, the forward's workspace and its layout. One copy for two builds, which differ only in a
// `Build` policy (below): the CUDA extension (binding.cpp, ortho_binding.cpp: device guard, current
// stream) and the test build that runs the same kernels on the SIMT emulator with CPU tensors
// (tests/ops/emulator/emulated_ops.cpp), so that the emulated tests exercise this code as shipped.
// Host code, never included by a .cu. It includes no ATen header itself: at::Tensor comes with the
// argument checks' headers and allocations are Tensor methods, since scripts/check_nvcc.sh keeps torch
// includes out of csrc/cuda/*.h (the headers the kernels include).
#pragma once

// The checks (torch) before launch.h: in the emulator build its cuda_runtime.h brings HIP-CPU's macros,
// which torch's headers must not see, and defines __CUDACC__, so that ortho_row.h, after it, takes the
// branch it takes in the emulated kernels' translation units.
#include "../ortho_checks.h"
#include "../topk_gate.h"

#include "launch.h"
#include "ortho_launch.h"

#include "../ortho_row.h"

namespace tdmpc2_moe::binding {

// What a build supplies: a `Build` struct that derives from BuildDefaults and adds
//   Guard: constructed from the inputs' device after their checks, alive until the launch is enqueued
//     (CUDA: c10::cuda::CUDAGuard, which also makes the current stream that device's);
//   static cudaStream_t stream(): the stream to enqueue on, asked while the guard is alive;
// and may hide workspace() or check_launch() with its own.
struct BuildDefaults {
	// Scratch memory of one launch as the allocator hands it out (on CUDA: the caching allocator on the
	// current stream, so concurrent calls on other streams never share it): the kernels may not rely on
	// its contents.
	static at::Tensor workspace(const at::Tensor& like, at::IntArrayRef sizes, at::ScalarType dtype) {
		return like.new_empty(sizes, like.options().dtype(dtype));
	}

	static void check_launch(cudaError_t err) {
		TORCH_CHECK(err == cudaSuccess, "tdmpc2_moe CUDA kernel launch failed: ", cudaGetErrorString(err));
	}
};

inline GateDtype gate_dtype(at::ScalarType t) {
	if (t == at::kHalf) return GateDtype::kFloat16;
	if (t == at::kBFloat16) return GateDtype::kBFloat16;
	TORCH_CHECK(t == at::kFloat, "tdmpc2_moe CUDA kernels take float32, float16 or bfloat16, got ", t);
	return GateDtype::kFloat32;
}

// The kernels compute in float32; float64 logits are narrowed on the way in (as the CPU path does).
inline at::Tensor kernel_input(const at::Tensor& logits) {
	return (logits.scalar_type() == at::kDouble ? logits.to(at::kFloat) : logits).contiguous();
}

template <class Build>
GateOutputs gate_forward(const at::Tensor& logits_in, int64_t k, double temperature, bool renormalize,
		at::Tensor* ring, at::Tensor* cursor) {
	check_gate_args(logits_in, k, temperature);
	if (ring) check_ring_args(logits_in, *ring, *cursor);
	const typename Build::Guard guard(logits_in.device());
	const at::Tensor logits = kernel_input(logits_in);
	const int64_t n = logits.size(0), e = logits.size(1);
	const auto f32 = logits.options().dtype(at::kFloat);
	at::Tensor weights = logits.new_empty({n, k}, f32);
	at::Tensor indices = logits.new_empty({n, k}, logits.options().dtype(at::kLong));
	at::Tensor prob_mean = logits.new_empty({e}, f32);
	at::Tensor frac = logits.new_empty({e}, f32);
	at::Tensor lse = logits.new_empty({n}, f32);
	GateForwardParams p{};
	p.logits = logits.const_data_ptr();
	p.logits_dtype = gate_dtype(logits.scalar_type());
	p.n = n;
	p.e = static_cast<int>(e);
	p.k = static_cast<int>(k);
	p.temperature = check_temperature(temperature);
	p.renormalize = renormalize;
	p.weights = weights.data_ptr<float>();
	p.indices = indices.data_ptr<int64_t>();
	p.prob_mean = prob_mean.data_ptr<float>();
	p.frac = frac.data_ptr<float>();
	p.lse = lse.data_ptr<float>();
	// Per-block statistics and the ticket of the last block (launch.h), in one allocation.
	const int64_t blocks = topk_gate_forward_blocks(n, static_cast<int>(e));
	at::Tensor work = Build::workspace(logits, {2 * blocks * e + 1}, at::kInt);
	p.part_prob = reinterpret_cast<float*>(work.data_ptr<int32_t>());
	p.part_count = reinterpret_cast<unsigned*>(work.data_ptr<int32_t>() + blocks * e);
	p.ticket = reinterpret_cast<unsigned*>(work.data_ptr<int32_t>() + 2 * blocks * e);
	if (ring) {
		p.ring = ring->data_ptr();
		p.ring_dtype = gate_dtype(ring->scalar_type());
		p.capacity = ring->size(0);
		p.cursor = cursor->data_ptr<int64_t>();
	}
	Build::check_launch(launch_topk_gate_forward(p, Build::stream()));
	return {weights, indices, prob_mean, frac, lse};
}

template <class Build>
GateOutputs topk_gate(const at::Tensor& logits, int64_t k, double temperature, bool renormalize) {
	return gate_forward<Build>(logits, k, temperature, renormalize, nullptr, nullptr);
}

template <class Build>
GateOutputs topk_gate_record(const at::Tensor& logits, int64_t k, double temperature, bool renormalize,
		at::Tensor& ring, at::Tensor& cursor) {
	return gate_forward<Build>(logits, k, temperature, renormalize, &ring, &cursor);
}

template <class Build>
at::Tensor topk_gate_backward(const std::optional<at::Tensor>& grad_weights,
		const std::optional<at::Tensor>& grad_prob_mean, const std::optional<at::Tensor>& grad_lse,
		const at::Tensor& logits_in, const at::Tensor& indices_in, double temperature, bool renormalize) {
	const auto [gw, gpm, glse] =
			check_backward_args(grad_weights, grad_prob_mean, grad_lse, logits_in, indices_in, temperature);
	const typename Build::Guard guard(logits_in.device());
	const at::Tensor logits = kernel_input(logits_in);
	const at::Tensor indices = indices_in.contiguous();
	at::Tensor grad = logits.new_empty(logits.sizes());
	GateBackwardParams p{};
	p.grad_weights = gw.defined() ? gw.const_data_ptr<float>() : nullptr;
	p.grad_prob_mean = gpm.defined() ? gpm.const_data_ptr<float>() : nullptr;
	p.grad_lse = glse.defined() ? glse.const_data_ptr<float>() : nullptr;
	p.logits = logits.const_data_ptr();
	p.dtype = gate_dtype(logits.scalar_type());
	p.indices = indices.const_data_ptr<int64_t>();
	p.n = logits.size(0);
	p.e = static_cast<int>(logits.size(1));
	p.k = static_cast<int>(indices.size(1));
	p.temperature = check_temperature(temperature);
	p.renormalize = renormalize;
	p.grad_logits = grad.data_ptr();
	Build::check_launch(launch_topk_gate_backward(p, Build::stream()));
	return grad.to(logits_in.scalar_type());
}

template <class Build>
at::Tensor ortho_run(const at::Tensor& features, const at::Tensor* grad, double eps) {
	const typename Build::Guard guard(features.device());
	// float64 is computed in float64, every other dtype in float32 (as on the CPU).
	const at::ScalarType compute = ortho_compute_dtype(features);
	const at::Tensor x = features.to(compute).contiguous();
	const at::Tensor g = grad ? grad->to(compute).contiguous() : at::Tensor();
	at::Tensor out = x.new_empty(x.sizes());
	// The backward's gradients of the q_j.
	const at::Tensor work = grad ? Build::workspace(x, x.sizes(), compute) : at::Tensor();
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
	const cudaStream_t stream = Build::stream();
	Build::check_launch(grad ? launch_orthonormalize_backward(p, stream) : launch_orthonormalize(p, stream));
	return out.to(features.scalar_type());
}

template <class Build>
at::Tensor orthonormalize(const at::Tensor& features, double eps) {
	check_ortho_args(features, eps);
	return ortho_run<Build>(features, nullptr, eps);
}

// The backward kernel keeps a row's 2 E^2 + 2 E coefficients in shared memory (48 KiB without opt-in).
constexpr size_t kOrthoCoefBytes = 48 * 1024;

template <class Build>
at::Tensor orthonormalize_backward(const at::Tensor& grad, const at::Tensor& features, double eps) {
	check_ortho_backward_args(grad, features, eps);
	const size_t elem = ortho_compute_dtype(features) == at::kDouble ? sizeof(double) : sizeof(float);
	const int e = static_cast<int>(features.size(0));
	TORCH_CHECK_VALUE(static_cast<size_t>(ortho_coef_size(e)) * elem <= kOrthoCoefBytes, "features: n_experts E=", e,
			" is more than the CUDA backward supports (its coefficients must fit in ", kOrthoCoefBytes,
			" bytes of shared memory: E <= 77 in float32, 54 in float64)");
	return ortho_run<Build>(features, &grad, eps);
}

}  // namespace tdmpc2_moe::binding
