// The one autograd implementation of tdmpc2_moe::orthonormalize: a C++ torch::autograd::Function
// registered at the op's own Autograd key, as autograd.cpp does for topk_gate (eager calls,
// torch.compile and torch.library.opcheck all go through it). Only the features are saved: the
// backward op recomputes the forward per row (ortho_row.h), which costs less than reading E^2 saved
// residuals back from memory.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

namespace tdmpc2_moe {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

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

}  // namespace
}  // namespace tdmpc2_moe

// The backward op is not differentiable (no double backward), so it has no autograd kernel here.
TORCH_LIBRARY_IMPL(tdmpc2_moe, Autograd, m) {
	m.impl("orthonormalize", &tdmpc2_moe::orthonormalize_autograd);
}
