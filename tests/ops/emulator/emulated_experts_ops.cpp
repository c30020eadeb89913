// Test-only operators of the routed experts on the SIMT emulator (see emulated_ops.cpp for the others):
//   tdmpc2_moe_emu::{routed_experts, routed_experts_train, routed_experts_backward} have the schemas of
//     tdmpc2_moe's and run the CUDA build's own binding code (csrc/cuda/routed_experts_binding_impl.h:
//     checks, outputs, the layout of saved, workspace, launcher calls) with the emulator's Build
//     (emulator_build.h) on CPU tensors; the kernels are csrc/cuda/routed_experts_kernels.cu, compiled
//     for the CPU in routed_experts_kernels.cpp.
//   tdmpc2_moe_emu::expert_weight_grad(variant, g, h, offsets): the backward's weight gradient alone, as
//     shipped (0) or with a planted bug (1: the tile loads' barrier missing, 2: float atomics;
//     routed_experts_planted.h), for the order pass to show that it would catch them.
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

// After the torch headers: the emulator's cuda_runtime.h brings HIP-CPU's macros (__device__, ...).
#include "emulator_build.h"

#include "routed_experts_planted.h"

namespace tdmpc2_moe {
namespace {

at::Tensor expert_weight_grad(int64_t variant, const at::Tensor& g_in, const at::Tensor& h_in,
		const at::Tensor& offsets_in) {
	TORCH_CHECK_VALUE(variant >= 0 && variant <= 2, "variant must be 0, 1 or 2");
	TORCH_CHECK_VALUE(g_in.dim() == 2 && h_in.dim() == 2 && g_in.size(0) == h_in.size(0) &&
					g_in.scalar_type() == at::kFloat && h_in.scalar_type() == at::kFloat,
			"g and h must be float32 [S, out] and [S, in]");
	TORCH_CHECK_VALUE(offsets_in.dim() == 1 && offsets_in.numel() >= 2 && offsets_in.scalar_type() == at::kLong,
			"offsets must be int64 [E + 1]");
	const at::Tensor g = g_in.contiguous(), h = h_in.contiguous(), offsets = offsets_in.contiguous();
	const int64_t e = offsets.numel() - 1;
	at::Tensor dw = at::zeros({e, g.size(1), h.size(1)}, g.options());
	tdmpc2_moe_emu_planted::weight_grad(static_cast<tdmpc2_moe_emu_planted::Variant>(variant), g.const_data_ptr<float>(),
			h.const_data_ptr<float>(), dw.data_ptr<float>(), offsets.const_data_ptr<int64_t>(), static_cast<int>(e),
			g.size(0), g.size(1), h.size(1));
	EmulatorBuild::check_launch(cudaGetLastError());
	return dw;
}

}  // namespace
}  // namespace tdmpc2_moe

TORCH_LIBRARY_FRAGMENT(tdmpc2_moe_emu, m) {
	m.def("routed_experts(Tensor x, Tensor indices, Tensor weights, Tensor[] params, int[] activations, "
		  "int simnorm_dim) -> Tensor");
	m.def("routed_experts_train(Tensor x, Tensor indices, Tensor weights, Tensor[] params, int[] activations, "
		  "int simnorm_dim) -> (Tensor out, Tensor[] saved)");
	m.def("routed_experts_backward(Tensor grad_out, Tensor x, Tensor indices, Tensor weights, Tensor[] params, "
		  "Tensor[] saved, int[] activations, int simnorm_dim, bool input_grad) -> "
		  "(Tensor grad_x, Tensor grad_weights, Tensor[] grad_params)");
	m.def("expert_weight_grad(int variant, Tensor g, Tensor h, Tensor offsets) -> Tensor");
}

TORCH_LIBRARY_IMPL(tdmpc2_moe_emu, CPU, m) {
	using tdmpc2_moe::EmulatorBuild;
	namespace binding = tdmpc2_moe::binding;
	m.impl("routed_experts", &binding::routed_experts<EmulatorBuild>);
	m.impl("routed_experts_train", &binding::routed_experts_train<EmulatorBuild>);
	m.impl("routed_experts_backward", &binding::routed_experts_backward<EmulatorBuild>);
	m.impl("expert_weight_grad", &tdmpc2_moe::expert_weight_grad);
}
