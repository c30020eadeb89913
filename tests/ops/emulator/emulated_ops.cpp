// Test-only operators that run the shipped CUDA kernels (csrc/cuda/*.cu, compiled for the CPU in
// topk_gate_kernels.cpp / ortho_kernels.cpp) on the SIMT emulator, on CPU tensors. Built by
// tests/ops/emulator/simt_emulator.py with torch.utils.cpp_extension; never part of the shipped extension.
//   tdmpc2_moe_emu::{topk_gate, topk_gate_record, topk_gate_backward, orthonormalize, orthonormalize_backward}
//     have the schemas of tdmpc2_moe's ops and run the CUDA build's own binding code
//     (csrc/cuda/binding_impl.h: argument checks, outputs, workspace layout, launcher calls) with the
//     emulator's Build: no device guard (CPU tensors), no stream (launches are synchronous), faults of
//     the emulator checked after each launch, and a workspace filled with garbage.
//   (The routed experts' ops, tdmpc2_moe_emu::routed_experts*, are in emulated_experts_ops.cpp; the
//   Build policy both files use is emulator_build.h.)
//   tdmpc2_moe_emu::set_schedule(blocks, threads, seed, sequential): the execution order of later
//     launches (include/tdmpc2_simt_emulator.h: 0 identity, 1 reversed, 2 seeded permutation).
//   tdmpc2_moe_emu::block_starts(): the logical blocks of the last sequential launch, in the order they ran.
//   tdmpc2_moe_emu::negative_control(which, x): runs one of the wrong kernels of negative_controls.cpp on
//     x ([blocks * 64] float32) and returns its output.
// A launch error or an emulator fault (barrier divergence, a partial warp shuffle) raises RuntimeError.
#include <ATen/core/Tensor.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

// After the torch headers: the emulator's cuda_runtime.h brings HIP-CPU's macros (__device__, ...).
#include "emulator_build.h"

#include "negative_controls.h"

namespace tdmpc2_moe {
namespace {

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
	EmulatorBuild::check_launch(cudaGetLastError());
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
	using tdmpc2_moe::EmulatorBuild;
	namespace binding = tdmpc2_moe::binding;
	m.impl("topk_gate", &binding::topk_gate<EmulatorBuild>);
	m.impl("topk_gate_record", &binding::topk_gate_record<EmulatorBuild>);
	m.impl("topk_gate_backward", &binding::topk_gate_backward<EmulatorBuild>);
	m.impl("orthonormalize", &binding::orthonormalize<EmulatorBuild>);
	m.impl("orthonormalize_backward", &binding::orthonormalize_backward<EmulatorBuild>);
	m.impl("negative_control", &tdmpc2_moe::negative_control);
}

TORCH_LIBRARY_IMPL(tdmpc2_moe_emu, CompositeExplicitAutograd, m) {
	m.impl("set_schedule", &tdmpc2_moe::set_schedule);
	m.impl("block_starts", &tdmpc2_moe::block_starts);
}
