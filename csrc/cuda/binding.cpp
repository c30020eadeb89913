// CUDA dispatch glue: argument checks, device guard, current stream, output allocation; the kernels
// are in topk_gate.cu. Compiled only in CUDA builds (setup.py).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../topk_gate.h"
#include "launch.h"

namespace tdmpc2_moe {
namespace {

GateDtype gate_dtype(at::ScalarType t) {
	if (t == at::kHalf) return GateDtype::kFloat16;
	if (t == at::kBFloat16) return GateDtype::kBFloat16;
	TORCH_CHECK(t == at::kFloat, "tdmpc2_moe CUDA kernels take float32, float16 or bfloat16, got ", t);
	return GateDtype::kFloat32;
}

void check_launch(cudaError_t err) {
	TORCH_CHECK(err == cudaSuccess, "tdmpc2_moe CUDA kernel launch failed: ", cudaGetErrorString(err));
}

// The kernels compute in float32; float64 logits are narrowed on the way in (as the CPU path does).
at::Tensor kernel_input(const at::Tensor& logits) {
	return (logits.scalar_type() == at::kDouble ? logits.to(at::kFloat) : logits).contiguous();
}

GateOutputs forward_cuda(const at::Tensor& logits_in, int64_t k, double temperature, bool renormalize, at::Tensor* ring,
		at::Tensor* cursor) {
	check_gate_args(logits_in, k, temperature);
	if (ring) check_ring_args(logits_in, *ring, *cursor);
	const c10::cuda::CUDAGuard guard(logits_in.device());
	const at::Tensor logits = kernel_input(logits_in);
	const int64_t n = logits.size(0), e = logits.size(1);
	const auto f32 = logits.options().dtype(at::kFloat);
	at::Tensor weights = at::empty({n, k}, f32);
	at::Tensor indices = at::empty({n, k}, logits.options().dtype(at::kLong));
	at::Tensor prob_mean = at::empty({e}, f32);
	at::Tensor frac = at::empty({e}, f32);
	at::Tensor lse = at::empty({n}, f32);
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
	// Per-block statistics and the ticket of the last block (launch.h); taken from the caching allocator
	// on the current stream, so concurrent calls on other streams never share one.
	const int64_t blocks = topk_gate_forward_blocks(n, static_cast<int>(e));
	at::Tensor work = at::empty({2 * blocks * e + 1}, logits.options().dtype(at::kInt));
	p.part_prob = reinterpret_cast<float*>(work.data_ptr<int32_t>());
	p.part_count = reinterpret_cast<unsigned*>(work.data_ptr<int32_t>() + blocks * e);
	p.ticket = reinterpret_cast<unsigned*>(work.data_ptr<int32_t>() + 2 * blocks * e);
	if (ring) {
		p.ring = ring->data_ptr();
		p.ring_dtype = gate_dtype(ring->scalar_type());
		p.capacity = ring->size(0);
		p.cursor = cursor->data_ptr<int64_t>();
	}
	check_launch(launch_topk_gate_forward(p, c10::cuda::getCurrentCUDAStream()));
	return {weights, indices, prob_mean, frac, lse};
}

GateOutputs topk_gate_cuda(const at::Tensor& logits, int64_t k, double temperature, bool renormalize) {
	return forward_cuda(logits, k, temperature, renormalize, nullptr, nullptr);
}

GateOutputs topk_gate_record_cuda(const at::Tensor& logits, int64_t k, double temperature, bool renormalize,
		at::Tensor& ring, at::Tensor& cursor) {
	return forward_cuda(logits, k, temperature, renormalize, &ring, &cursor);
}

at::Tensor topk_gate_backward_cuda(const std::optional<at::Tensor>& grad_weights,
		const std::optional<at::Tensor>& grad_prob_mean, const std::optional<at::Tensor>& grad_lse,
		const at::Tensor& logits_in, const at::Tensor& indices_in, double temperature, bool renormalize) {
	const auto [gw, gpm, glse] =
			check_backward_args(grad_weights, grad_prob_mean, grad_lse, logits_in, indices_in, temperature);
	const c10::cuda::CUDAGuard guard(logits_in.device());
	const at::Tensor logits = kernel_input(logits_in);
	const at::Tensor indices = indices_in.contiguous();
	at::Tensor grad = at::empty(logits.sizes(), logits.options());
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
	check_launch(launch_topk_gate_backward(p, c10::cuda::getCurrentCUDAStream()));
	return grad.to(logits_in.scalar_type());
}

}  // namespace
}  // namespace tdmpc2_moe

TORCH_LIBRARY_IMPL(tdmpc2_moe, CUDA, m) {
	m.impl("topk_gate", &tdmpc2_moe::topk_gate_cuda);
	m.impl("topk_gate_record", &tdmpc2_moe::topk_gate_record_cuda);
	m.impl("topk_gate_backward", &tdmpc2_moe::topk_gate_backward_cuda);
}
