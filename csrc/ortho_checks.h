// Argument checks of the orthonormalisation ops, shared by the CPU kernels and the CUDA binding. Each
// runs before a kernel reads a tensor and raises c10::ValueError (Python: ValueError) naming the argument.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>

namespace tdmpc2_moe {

// The kernels compute in float64 for float64 features (as the reference does) and in float32 otherwise.
inline at::ScalarType ortho_compute_dtype(const at::Tensor& features) {
	return features.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_ortho_args(const at::Tensor& features, double eps) {
	TORCH_CHECK_VALUE(features.dim() == 3, "features must be 3-D [E, N, D], got ", features.dim(), " dimensions");
	TORCH_CHECK_VALUE(at::isFloatingType(features.scalar_type()), "features must be floating point, got ",
			features.scalar_type());
	const int64_t e = features.size(0), d = features.size(2);
	TORCH_CHECK_VALUE(e <= d, "features: n_experts E=", e, " exceeds the feature width D=", d);
	TORCH_CHECK_VALUE(d <= INT32_MAX, "features: width D=", d, " exceeds 2^31 - 1");
	// eps^2 is the floor of the squared norm: it must stay positive and finite in the compute dtype.
	const bool ok = ortho_compute_dtype(features) == at::kDouble
			? std::isfinite(eps * eps) && eps * eps > 0
			: std::isfinite(static_cast<float>(eps * eps)) && static_cast<float>(eps * eps) > 0.f;
	TORCH_CHECK_VALUE(std::isfinite(eps) && eps > 0 && ok, "eps must be > 0 with eps**2 positive and finite in the "
			"compute dtype, got ", eps);
}

inline void check_ortho_backward_args(const at::Tensor& grad, const at::Tensor& features, double eps) {
	check_ortho_args(features, eps);
	TORCH_CHECK_VALUE(grad.device() == features.device(), "grad must be on the device of features (",
			features.device(), "), got ", grad.device());
	TORCH_CHECK_VALUE(at::isFloatingType(grad.scalar_type()), "grad must be floating point, got ", grad.scalar_type());
	TORCH_CHECK_VALUE(grad.sizes() == features.sizes(), "grad must have the shape of features ", features.sizes(),
			", got ", grad.sizes());
}

}  // namespace tdmpc2_moe
