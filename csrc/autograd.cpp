// Eager-mode autograd of top-k gating in C++: tdmpc2_moe::topk_gate_eager and topk_gate_record_eager
// run the same dispatcher ops (topk_gate, topk_gate_record, topk_gate_backward, so the same CPU or CUDA
// kernels) as the registered ops, under a C++ torch::autograd::Function instead of the Python autograd
// kernel of torch.library. That kernel costs tens of microseconds per call in Python, as much as the
// forward and backward kernels of a 512 x 8 gate together. tdmpc2_moe.ops uses these ops outside
// torch.compile only; traced code and opcheck keep the registered ops and their Python registrations.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>

#include "topk_gate.h"

namespace tdmpc2_moe {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using GateFn = GateOutputs(const at::Tensor&, int64_t, double, bool);
using RecordFn = GateOutputs(const at::Tensor&, int64_t, double, bool, at::Tensor&, at::Tensor&);
using BackwardFn = at::Tensor(const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
		const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, double, bool);

const c10::TypedOperatorHandle<GateFn>& gate_op() {
	static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("tdmpc2_moe::topk_gate", "").typed<GateFn>();
	return op;
}

const c10::TypedOperatorHandle<RecordFn>& record_op() {
	static const auto op =
			c10::Dispatcher::singleton().findSchemaOrThrow("tdmpc2_moe::topk_gate_record", "").typed<RecordFn>();
	return op;
}

const c10::TypedOperatorHandle<BackwardFn>& backward_op() {
	static const auto op =
			c10::Dispatcher::singleton().findSchemaOrThrow("tdmpc2_moe::topk_gate_backward", "").typed<BackwardFn>();
	return op;
}

// Runs the forward op below autograd (the registered ops' Python autograd kernels are skipped), on the
// device's kernel. ring and cursor are null without history.
GateOutputs forward_below_autograd(const at::Tensor& logits, int64_t k, double temperature, bool renormalize,
		at::Tensor* ring, at::Tensor* cursor) {
	const at::AutoDispatchBelowADInplaceOrView below_autograd;
	if (ring) return record_op().call(logits, k, temperature, renormalize, *ring, *cursor);
	return gate_op().call(logits, k, temperature, renormalize);
}

std::optional<at::Tensor> present(const at::Tensor& grad) {
	return grad.defined() ? std::optional<at::Tensor>(grad) : std::nullopt;
}

struct TopkGateFunction : torch::autograd::Function<TopkGateFunction> {
	// ring and cursor are passed as pointers, not tensors: they are written, never differentiated.
	static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, int64_t k, double temperature,
			bool renormalize, at::Tensor* ring, at::Tensor* cursor) {
		auto [weights, indices, prob_mean, frac, lse] =
				forward_below_autograd(logits, k, temperature, renormalize, ring, cursor);
		// As the Python registration: logits and indices only (the backward recomputes the softmax).
		ctx->save_for_backward({logits, indices});
		ctx->saved_data["temperature"] = temperature;
		ctx->saved_data["renormalize"] = renormalize;
		ctx->mark_non_differentiable({indices, frac});
		// Gradients of unused outputs then arrive undefined and the kernel skips them.
		ctx->set_materialize_grads(false);
		return {weights, indices, prob_mean, frac, lse};
	}

	static variable_list backward(AutogradContext* ctx, variable_list grads) {
		const variable_list saved = ctx->get_saved_variables();
		at::Tensor grad;
		if (ctx->needs_input_grad(0))
			grad = backward_op().call(present(grads[0]), present(grads[2]), present(grads[4]), saved[0], saved[1],
					ctx->saved_data["temperature"].toDouble(), ctx->saved_data["renormalize"].toBool());
		return {grad, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
	}
};

GateOutputs eager(const at::Tensor& logits, int64_t k, double temperature, bool renormalize, at::Tensor* ring,
		at::Tensor* cursor) {
	// Without a graph to build (no_grad, or logits not requiring grad) no autograd node is made at all.
	if (!at::GradMode::is_enabled() || !logits.requires_grad())
		return forward_below_autograd(logits, k, temperature, renormalize, ring, cursor);
	const variable_list out = TopkGateFunction::apply(logits, k, temperature, renormalize, ring, cursor);
	return {out[0], out[1], out[2], out[3], out[4]};
}

GateOutputs topk_gate_eager(const at::Tensor& logits, int64_t k, double temperature, bool renormalize) {
	return eager(logits, k, temperature, renormalize, nullptr, nullptr);
}

GateOutputs topk_gate_record_eager(const at::Tensor& logits, int64_t k, double temperature, bool renormalize,
		at::Tensor& ring, at::Tensor& cursor) {
	return eager(logits, k, temperature, renormalize, &ring, &cursor);
}

}  // namespace
}  // namespace tdmpc2_moe

// CompositeImplicitAutograd: one kernel for every device and for the autograd keys; the Function makes
// the graph node and the ops it calls pick the device's kernels.
TORCH_LIBRARY_IMPL(tdmpc2_moe, CompositeImplicitAutograd, m) {
	m.impl("topk_gate_eager", &tdmpc2_moe::topk_gate_eager);
	m.impl("topk_gate_record_eager", &tdmpc2_moe::topk_gate_record_eager);
}
