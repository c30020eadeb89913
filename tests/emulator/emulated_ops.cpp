// Test-only operators that run the shipped CUDA kernels (csrc/cuda/*.cu, compiled for the CPU in
// topk_gate_kernels.cpp / ortho_kernels.cpp) on the SIMT emulator, on CPU tensors. Built by
// tests/emulator/simt_emulator.py with torch.utils.cpp_extension; never part of the shipped extension.
//   tdmpc2_moe_emu::{topk_gate, topk_gate_record, topk_gate_backward, orthonormalize, orthonormalize_backward}
//     have the schemas of tdmpc2_moe's ops and do what csrc/cuda/binding.cpp and ortho_binding.cpp do
//     (same argument checks, same outputs and workspace, same launcher calls), minus the CUDA device
//     guard and stream: those two files include c10/cuda headers and cannot be built without CUDA.
//   tdmpc2_moe_emu::set_schedule(blocks, threads, seed, sequential): the execution order of later
//     launches (include/tdmpc2_simt_emulator.h: 0 identity, 1 reversed, 2 seeded permutation).
//   tdmpc2_moe_emu::block_starts(): the logical blocks of the last sequential launch, in the order they ran.
//   tdmpc2_moe_emu::negative_control(which, x): runs one of the wrong kernels of negative_controls.cpp on
//     x ([blocks * 64] float32) and returns its output.
// A launch error or an emulator fault (barrier divergence, a partial warp shuffle) raises RuntimeError.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include "ortho_checks.h"
#include "topk_gate.h"
// After the torch headers: the emulator's cuda_runtime.h brings HIP-CPU's macros (__device__, ...).
#include "cuda/launch.h"
#include "cuda/ortho_launch.h"
#include "ortho_row.h"

#include "negative_controls.h"

namespace tdmpc2_moe {
namespace {

void check_launch(cudaError_t err) {
	std::string fault;
	{
		auto& r = tdmpc2_moe_emu::record();
		std::lock_guard<std::mutex> lock(r.mutex);
		fault = std::exchange(r.fault, std::string());
	}
	TORCH_CHECK(fault.empty(), "tdmpc2_moe emulated kernel fault: ", fault);
	TORCH_CHECK(err == cudaSuccess, "tdmpc2_moe CUDA kernel launch failed: ", cudaGetErrorString(err));
}

// From here to the end of the namespace: csrc/cuda/binding.cpp and ortho_binding.cpp, with CPU tensors.
GateDtype gate_dtype(at::ScalarType t) {
	if (t == at::kHalf) return GateDtype::kFloat16;
	if (t == at::kBFloat16) return GateDtype::kBFloat16;
	TORCH_CHECK(t == at::kFloat, "tdmpc2_moe CUDA kernels take float32, float16 or bfloat16, got ", t);
	return GateDtype::kFloat32;
}

at::Tensor kernel_input(const at::Tensor& logits) {
	return (logits.scalar_type() == at::kDouble ? logits.to(at::kFloat) : logits).contiguous();
}

GateOutputs forward_emu(const at::Tensor& logits_in, int64_t k, double temperature, bool renormalize, at::Tensor* ring,
		at::Tensor* cursor) {
	check_gate_args(logits_in, k, temperature);
	if (ring) check_ring_args(logits_in, *ring, *cursor);
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
	const int64_t blocks = topk_gate_forward_blocks(n, static_cast<int>(e));
	at::Tensor work = at::empty({2 * blocks * e + 1}, logits.options().dtype(at::kInt));
	p.part_prob = reinterpret_cast<float*>(work.data_ptr<int32_t>());
	p.part_count = reinterpret_cast<unsigned*>(work.data_ptr<int32_t>() + blocks * e);
	p.ticket = reinterpret_cast<unsigned*>(work.data_ptr<int32_t>() + 2 * blocks * e);
	// Unlike the caching allocator's reuse, a fresh allocation may hold zeros: a nonzero ticket checks
	// that the launcher's memset, not luck, zeroes it.
	*p.ticket = 0xdeadbeefu;
	if (ring) {
		p.ring = ring->data_ptr();
		p.ring_dtype = gate_dtype(ring->scalar_type());
		p.capacity = ring->size(0);
		p.cursor = cursor->data_ptr<int64_t>();
	}
	check_launch(launch_topk_gate_forward(p, nullptr));
	return {weights, indices, prob_mean, frac, lse};
}

GateOutputs topk_gate_emu(const at::Tensor& logits, int64_t k, double temperature, bool renormalize) {
	return forward_emu(logits, k, temperature, renormalize, nullptr, nullptr);
}

GateOutputs topk_gate_record_emu(const at::Tensor& logits, int64_t k, double temperature, bool renormalize,
		at::Tensor& ring, at::Tensor& cursor) {
	return forward_emu(logits, k, temperature, renormalize, &ring, &cursor);
}

at::Tensor topk_gate_backward_emu(const std::optional<at::Tensor>& grad_weights,
		const std::optional<at::Tensor>& grad_prob_mean, const std::optional<at::Tensor>& grad_lse,
		const at::Tensor& logits_in, const at::Tensor& indices_in, double temperature, bool renormalize) {
	const auto [gw, gpm, glse] =
			check_backward_args(grad_weights, grad_prob_mean, grad_lse, logits_in, indices_in, temperature);
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
	check_launch(launch_topk_gate_backward(p, nullptr));
	return grad.to(logits_in.scalar_type());
}

at::Tensor run_ortho(const at::Tensor& features, const at::Tensor* grad, double eps) {
	const at::ScalarType compute = ortho_compute_dtype(features);
	const at::Tensor x = features.to(compute).contiguous();
	const at::Tensor g = grad ? grad->to(compute).contiguous() : at::Tensor();
	at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
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
	check_launch(grad ? launch_orthonormalize_backward(p, nullptr) : launch_orthonormalize(p, nullptr));
	return out.to(features.scalar_type());
}

at::Tensor orthonormalize_emu(const at::Tensor& features, double eps) {
	check_ortho_args(features, eps);
	return run_ortho(features, nullptr, eps);
}

constexpr size_t kCoefBytes = 48 * 1024;

at::Tensor orthonormalize_backward_emu(const at::Tensor& grad, const at::Tensor& features, double eps) {
	check_ortho_backward_args(grad, features, eps);
	const size_t elem = ortho_compute_dtype(features) == at::kDouble ? sizeof(double) : sizeof(float);
	const int e = static_cast<int>(features.size(0));
	TORCH_CHECK_VALUE(static_cast<size_t>(ortho_coef_size(e)) * elem <= kCoefBytes, "features: n_experts E=", e,
			" is more than the CUDA backward supports (its coefficients must fit in ", kCoefBytes,
			" bytes of shared memory: E <= 77 in float32, 54 in float64)");
	return run_ortho(features, &grad, eps);
}

void set_schedule(int64_t blocks, int64_t threads, int64_t seed, bool sequential) {
	TORCH_CHECK_VALUE(blocks >= 0 && blocks <= 2 && threads >= 0 && threads <= 2, "orders are 0, 1 or 2");
	auto& s = tdmpc2_moe_emu::schedule();
	s.blocks = static_cast<tdmpc2_moe_emu::Order>(blocks);
	s.threads = static_cast<tdmpc2_moe_emu::Order>(threads);
	s.seed = static_cast<uint64_t>(seed);
	s.sequential = sequential;
}

at::Tensor block_starts() {
	auto& r = tdmpc2_moe_emu::record();
	std::lock_guard<std::mutex> lock(r.mutex);
	return at::tensor(std::vector<int64_t>(r.block_starts.begin(), r.block_starts.end()), at::kLong);
}

at::Tensor negative_control(int64_t which, const at::Tensor& x) {
	TORCH_CHECK_VALUE(which >= 0 && which <= 2, "which must be 0, 1 or 2");
	TORCH_CHECK_VALUE(x.dim() == 1 && x.scalar_type() == at::kFloat && x.numel() > 0 && x.numel() % 64 == 0,
			"x must be float32 [blocks * 64]");
	const at::Tensor in = x.contiguous();
	at::Tensor out = at::zeros_like(in);
	tdmpc2_moe_emu_controls::run(static_cast<tdmpc2_moe_emu_controls::Control>(which), in.const_data_ptr<float>(),
			out.data_ptr<float>(), static_cast<int>(in.numel() / 64));
	check_launch(cudaGetLastError());
	return out;
}

}  // namespace
}  // namespace tdmpc2_moe

TORCH_LIBRARY(tdmpc2_moe_emu, m) {
	m.def("topk_gate(Tensor logits, int k, float temperature, bool renormalize) -> "
		  "(Tensor weights, Tensor indices, Tensor expert_prob_mean, Tensor expert_frac, Tensor lse)");
	m.def("topk_gate_record(Tensor logits, int k, float temperature, bool renormalize, Tensor(a!) ring, "
		  "Tensor(b!) cursor) -> "
		  "(Tensor weights, Tensor indices, Tensor expert_prob_mean, Tensor expert_frac, Tensor lse)");
	m.def("topk_gate_backward(Tensor? grad_weights, Tensor? grad_prob_mean, Tensor? grad_lse, Tensor logits, "
		  "Tensor indices, float temperature, bool renormalize) -> Tensor");
	m.def("orthonormalize(Tensor features, float eps) -> Tensor");
	m.def("orthonormalize_backward(Tensor grad, Tensor features, float eps) -> Tensor");
	m.def("set_schedule(int blocks, int threads, int seed, bool sequential) -> ()");
	m.def("block_starts() -> Tensor");
	m.def("negative_control(int which, Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(tdmpc2_moe_emu, CPU, m) {
	m.impl("topk_gate", &tdmpc2_moe::topk_gate_emu);
	m.impl("topk_gate_record", &tdmpc2_moe::topk_gate_record_emu);
	m.impl("topk_gate_backward", &tdmpc2_moe::topk_gate_backward_emu);
	m.impl("orthonormalize", &tdmpc2_moe::orthonormalize_emu);
	m.impl("orthonormalize_backward", &tdmpc2_moe::orthonormalize_backward_emu);
	m.impl("negative_control", &tdmpc2_moe::negative_control);
}

TORCH_LIBRARY_IMPL(tdmpc2_moe_emu, CompositeExplicitAutograd, m) {
	m.impl("set_schedule", &tdmpc2_moe::set_schedule);
	m.impl("block_starts", &tdmpc2_moe::block_starts);
}
