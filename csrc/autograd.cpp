// The one autograd implementation of each op: C++ torch::autograd::Functions registered at the
// Autograd key of the schemas themselves (tdmpc2_moe::topk_gate, topk_gate_record, orthonormalize,
// routed_experts). Eager calls, torch.compile (AOTAutograd traces this Function's forward and backward
// into its joint graph, the forward and backward ops then being opaque nodes with their Python fake kernels) and
// torch.library.opcheck all go through it. It replaces a Python registration (register_autograd)
// that cost more per call than the forward and backward kernels of a 512 x 8 gate together
// (benchmarks/README.md, "autograd path").
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

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

// Runs the forward op below the autograd keys: the device's kernel, or the fake kernel / functional
// wrapper while torch.compile traces. ring and cursor are null without history.
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
		// Logits and indices only: the backward recomputes the softmax instead of keeping [N, E] probs.
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

// The in-place write of the ring is visible to autograd's saved-tensor checks, as for any in-place op.
void bump_version(const at::Tensor& t) {
	if (!t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
}

GateOutputs autograd_forward(const at::Tensor& logits, int64_t k, double temperature, bool renormalize,
		at::Tensor* ring, at::Tensor* cursor) {
	GateOutputs out;
	// Without a graph to build (no_grad, or logits not requiring grad) no autograd node is made at all.
	if (!at::GradMode::is_enabled() || !logits.requires_grad()) {
		out = forward_below_autograd(logits, k, temperature, renormalize, ring, cursor);
	} else {
		const variable_list v = TopkGateFunction::apply(logits, k, temperature, renormalize, ring, cursor);
		out = {v[0], v[1], v[2], v[3], v[4]};
	}
	if (ring) {
		bump_version(*ring);
		bump_version(*cursor);
	}
	return out;
}

GateOutputs topk_gate_autograd(const at::Tensor& logits, int64_t k, double temperature, bool renormalize) {
	return autograd_forward(logits, k, temperature, renormalize, nullptr, nullptr);
}

GateOutputs topk_gate_record_autograd(const at::Tensor& logits, int64_t k, double temperature, bool renormalize,
		at::Tensor& ring, at::Tensor& cursor) {
	return autograd_forward(logits, k, temperature, renormalize, &ring, &cursor);
}

// orthonormalize: only the features are saved; the backward op recomputes the forward per row
// (ortho_row.h), which costs less than reading E^2 saved residuals back from memory.


using OrthoFn = at::Tensor(const at::Tensor&, double);
using OrthoBackwardFn = at::Tensor(const at::Tensor&, const at::Tensor&, double);

const c10::TypedOperatorHandle<OrthoFn>& ortho_op() {
	static const auto op =
			c10::Dispatcher::singleton().findSchemaOrThrow("tdmpc2_moe::orthonormalize", "").typed<OrthoFn>();
	return op;
}

const c10::TypedOperatorHandle<OrthoBackwardFn>& ortho_backward_op() {
	static const auto op = c10::Dispatcher::singleton()
			.findSchemaOrThrow("tdmpc2_moe::orthonormalize_backward", "")
			.typed<OrthoBackwardFn>();
	return op;
}

at::Tensor forward_below_autograd(const at::Tensor& features, double eps) {
	const at::AutoDispatchBelowADInplaceOrView below_autograd;
	return ortho_op().call(features, eps);
}

struct OrthonormalizeFunction : torch::autograd::Function<OrthonormalizeFunction> {
	static at::Tensor forward(AutogradContext* ctx, const at::Tensor& features, double eps) {
		ctx->save_for_backward({features});
		ctx->saved_data["eps"] = eps;
		return forward_below_autograd(features, eps);
	}

	static variable_list backward(AutogradContext* ctx, variable_list grads) {
		const variable_list saved = ctx->get_saved_variables();
		return {ortho_backward_op().call(grads[0], saved[0], ctx->saved_data["eps"].toDouble()), at::Tensor()};
	}
};

at::Tensor orthonormalize_autograd(const at::Tensor& features, double eps) {
	// Without a graph to build no autograd node is made at all.
	if (!at::GradMode::is_enabled() || !features.requires_grad()) return forward_below_autograd(features, eps);
	return OrthonormalizeFunction::apply(features, eps);
}

// routed_experts: the training forward keeps the grouping and every layer's input, normalised
// pre-activation and 1 / sigma (routed_experts.h), which the backward op reads instead of recomputing the
// experts' layers.

using ExpertsFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::TensorList, at::IntArrayRef,
		int64_t);
using ExpertsTrainFn = std::tuple<at::Tensor, std::vector<at::Tensor>>(const at::Tensor&, const at::Tensor&,
		const at::Tensor&, at::TensorList, at::IntArrayRef, int64_t);
using ExpertsBackwardFn = std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>>(const at::Tensor&,
		const at::Tensor&, const at::Tensor&, const at::Tensor&, at::TensorList, at::TensorList, at::IntArrayRef, int64_t,
		bool);

const c10::TypedOperatorHandle<ExpertsFn>& experts_op() {
	static const auto op =
			c10::Dispatcher::singleton().findSchemaOrThrow("tdmpc2_moe::routed_experts", "").typed<ExpertsFn>();
	return op;
}

const c10::TypedOperatorHandle<ExpertsTrainFn>& experts_train_op() {
	static const auto op =
			c10::Dispatcher::singleton().findSchemaOrThrow("tdmpc2_moe::routed_experts_train", "").typed<ExpertsTrainFn>();
	return op;
}

const c10::TypedOperatorHandle<ExpertsBackwardFn>& experts_backward_op() {
	static const auto op = c10::Dispatcher::singleton()
			.findSchemaOrThrow("tdmpc2_moe::routed_experts_backward", "")
			.typed<ExpertsBackwardFn>();
	return op;
}

struct RoutedExpertsFunction : torch::autograd::Function<RoutedExpertsFunction> {
	static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& indices,
			const at::Tensor& weights, at::TensorList params, at::IntArrayRef activations, int64_t simnorm_dim) {
		std::tuple<at::Tensor, std::vector<at::Tensor>> result;
		{
			const at::AutoDispatchBelowADInplaceOrView below_autograd;
			result = experts_train_op().call(x, indices, weights, params, activations, simnorm_dim);
		}
		variable_list keep{x, indices, weights};
		keep.insert(keep.end(), params.begin(), params.end());
		const std::vector<at::Tensor>& saved = std::get<1>(result);
		keep.insert(keep.end(), saved.begin(), saved.end());
		ctx->save_for_backward(keep);
		ctx->saved_data["activations"] = activations.vec();
		ctx->saved_data["simnorm_dim"] = simnorm_dim;
		ctx->saved_data["params"] = static_cast<int64_t>(params.size());
		return std::get<0>(result);
	}

	static variable_list backward(AutogradContext* ctx, variable_list grads) {
		const variable_list kept = ctx->get_saved_variables();
		const int64_t n_params = ctx->saved_data["params"].toInt();
		const std::vector<at::Tensor> params(kept.begin() + 3, kept.begin() + 3 + n_params);
		const std::vector<at::Tensor> saved(kept.begin() + 3 + n_params, kept.end());
		const std::vector<int64_t> activations = ctx->saved_data["activations"].toIntVector();
		const bool input_grad = ctx->needs_input_grad(0);
		auto [grad_x, grad_weights, grad_params] = experts_backward_op().call(grads[0], kept[0], kept[1], kept[2], params,
				saved, activations, ctx->saved_data["simnorm_dim"].toInt(), input_grad);
		variable_list out{input_grad ? grad_x : at::Tensor(), at::Tensor(), grad_weights};
		out.insert(out.end(), grad_params.begin(), grad_params.end());
		out.push_back(at::Tensor());  // activations
		out.push_back(at::Tensor());  // simnorm_dim
		return out;
	}
};

at::Tensor routed_experts_autograd(const at::Tensor& x, const at::Tensor& indices, const at::Tensor& weights,
		at::TensorList params, at::IntArrayRef activations, int64_t simnorm_dim) {
	bool any = x.requires_grad() || weights.requires_grad();
	for (const at::Tensor& p : params) any = any || p.requires_grad();
	// Without a graph to build the inference forward runs: nothing is kept.
	if (!at::GradMode::is_enabled() || !any) {
		const at::AutoDispatchBelowADInplaceOrView below_autograd;
		return experts_op().call(x, indices, weights, params, activations, simnorm_dim);
	}
	return RoutedExpertsFunction::apply(x, indices, weights, params, activations, simnorm_dim);
}

}  // namespace
}  // namespace tdmpc2_moe

// One kernel for every device's autograd key; the ops it calls pick the device's kernels. The
// backward ops are not differentiable (no double backward), so they have no autograd kernel here.
TORCH_LIBRARY_IMPL(tdmpc2_moe, Autograd, m) {
	m.impl("topk_gate", &tdmpc2_moe::topk_gate_autograd);
	m.impl("topk_gate_record", &tdmpc2_moe::topk_gate_record_autograd);
	m.impl("orthonormalize", &tdmpc2_moe::orthonormalize_autograd);
	m.impl("routed_experts", &tdmpc2_moe::routed_experts_autograd);
}
