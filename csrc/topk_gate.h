// Argument checks and output shapes of the tdmpc2_moe operators, shared by every backend (CPU kernels,
// CUDA binding, the host-compiled row path). Each check runs before any kernel reads a tensor and
// raises c10::ValueError (Python: ValueError) naming the argument. Every tensor argument of every
// schema is checked for device and dtype here: the dispatcher picks the kernel from the highest
// backend among all tensor arguments, so e.g. CUDA logits with CPU indices reach the CUDA kernel,
// which must refuse them rather than hand a host pointer to the device.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cfloat>
#include <cmath>
#include <optional>
#include <tuple>

namespace tdmpc2_moe {

using GateOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Returns temperature as the float32 the kernels divide by, after checking that it is finite and
// positive both as given and after that narrowing (1e-46 would become 0, 1e39 inf).
inline float check_temperature(double temperature) {
	TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0 && temperature <= FLT_MAX &&
					static_cast<float>(temperature) > 0.f,
			"temperature must be finite and > 0 in float32, got ", temperature);
	return static_cast<float>(temperature);
}

inline void check_gate_args(const at::Tensor& logits, int64_t k, double temperature) {
	TORCH_CHECK_VALUE(logits.dim() == 2, "logits must be 2-D [N, E], got ", logits.dim(), " dimensions");
	const auto dt = logits.scalar_type();
	TORCH_CHECK_VALUE(at::isFloatingType(dt), "logits must be floating point, got ", dt);
	const int64_t e = logits.size(1);
	TORCH_CHECK_VALUE(e >= 1 && e <= 1024, "logits must have 1..1024 experts (columns), got ", e);
	TORCH_CHECK_VALUE(k >= 1 && k <= e, "k must be in 1..E=", e, ", got ", k);
	check_temperature(temperature);
}

inline void check_ring_args(const at::Tensor& logits, const at::Tensor& ring, const at::Tensor& cursor) {
	TORCH_CHECK_VALUE(ring.device() == logits.device(), "ring must be on the device of logits (", logits.device(),
			"), got ", ring.device());
	TORCH_CHECK_VALUE(cursor.device() == logits.device(), "cursor must be on the device of logits (",
			logits.device(), "), got ", cursor.device());
	TORCH_CHECK_VALUE(ring.dim() == 2 && ring.size(1) == logits.size(1) && ring.size(0) >= 1,
			"ring must be [capacity, E=", logits.size(1), "], got ", ring.sizes());
	TORCH_CHECK_VALUE(ring.is_contiguous(), "ring must be contiguous");
	const auto dt = ring.scalar_type();
	TORCH_CHECK_VALUE(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
			"ring must be float32, bfloat16 or float16, got ", dt);
	TORCH_CHECK_VALUE(cursor.numel() == 1 && cursor.scalar_type() == at::kLong, "cursor must be one int64, got ",
			cursor.sizes(), " ", cursor.scalar_type());
}

// Checks the backward's arguments; returns the gradients as float32 tensors (undefined if absent),
// contiguous unless `keep_strides` (then grad_weights and grad_lse keep theirs; grad_prob_mean is
// always contiguous).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> check_backward_args(
		const std::optional<at::Tensor>& grad_weights, const std::optional<at::Tensor>& grad_prob_mean,
		const std::optional<at::Tensor>& grad_lse, const at::Tensor& logits, const at::Tensor& indices,
		double temperature, bool keep_strides = false) {
	TORCH_CHECK_VALUE(indices.device() == logits.device(), "indices must be on the device of logits (",
			logits.device(), "), got ", indices.device());
	TORCH_CHECK_VALUE(indices.dim() == 2, "indices must be 2-D [N, k], got ", indices.sizes());
	check_gate_args(logits, indices.size(1), temperature);
	const int64_t n = logits.size(0), e = logits.size(1);
	TORCH_CHECK_VALUE(indices.size(0) == n && indices.scalar_type() == at::kLong,
			"indices must be int64 [N=", n, ", k], got ", indices.scalar_type(), " ", indices.sizes());
	auto as_float = [&](const std::optional<at::Tensor>& g, at::IntArrayRef shape, const char* name, bool strided) {
		if (!g.has_value() || !g->defined()) return at::Tensor();
		TORCH_CHECK_VALUE(g->device() == logits.device(), name, " must be on the device of logits (",
				logits.device(), "), got ", g->device());
		TORCH_CHECK_VALUE(at::isFloatingType(g->scalar_type()), name, " must be floating point, got ",
				g->scalar_type());
		TORCH_CHECK_VALUE(g->sizes() == shape, name, " must have shape ", shape, ", got ", g->sizes());
		const at::Tensor f = g->to(at::kFloat);
		return strided ? f : f.contiguous();
	};
	return {as_float(grad_weights, indices.sizes(), "grad_weights", keep_strides),
			as_float(grad_prob_mean, {e}, "grad_prob_mean", false), as_float(grad_lse, {n}, "grad_lse", keep_strides)};
}

}  // namespace tdmpc2_moe
