// The routed-experts operators (docs/design.md 22): what their arguments mean, their checks and the layout
// of what the forward keeps for the backward, shared by the CPU kernels (cpu/routed_experts.cpp) and the
// CUDA binding (cuda/binding_impl.h). Every check runs before a kernel reads a tensor and raises
// c10::ValueError (Python: ValueError) naming the argument.
//
// Arguments: rows `x` [N, in]; the gate's `indices` [N, k] (int64) and `weights` [N, k]; the experts'
// stacked parameters `params`, layer after layer: weight [E, out, in] and bias [E, out], then for a
// normed layer LayerNorm weight and bias [E, out]; `activations`, one per layer (ExpertAct);
// `simnorm_dim`, the group width of SimNorm layers. Slot r * k + j is row r's j-th choice. The result
// is out[r] = sum_j weights[r, j] * expert_{indices[r, j]}(x[r]), [N, out of the last layer].
//
// Slots are grouped per expert by a stable counting sort (by slot within an expert). The forward for
// training keeps, in `saved` (the routed_experts_train output):
//   saved[0]                 int64 [2 S + E + 1]: perm [S] (sorted position -> slot), pos [S] (slot ->
//                            sorted position), offsets [E + 1] (expert e's slots are positions
//                            offsets[e] .. offsets[e + 1]); S = N k;
//   saved[1 + l], l = 0..L   h_l [S, width]: layer l's input in sorted order (h_0 the gathered rows),
//                            h_L the experts' outputs;
//   then per normed layer    xhat [S, out] (the normalised pre-activation) and rstd [S] (1 / sigma).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <vector>

#include "expert_act.h"  // ExpertAct, kExpertNormEps

namespace tdmpc2_moe {

struct ExpertLayer {
	at::Tensor weight, bias, ln_weight, ln_bias;  // ln_* undefined for a plain Linear
	ExpertAct act;
	int64_t in, out;
	bool normed() const { return act != ExpertAct::kNone; }
};

inline int64_t expert_params_of(ExpertAct act) {
	return act == ExpertAct::kNone ? 2 : 4;
}

// Returns the layers of `params` / `activations` after checking every argument of the forward.
inline std::vector<ExpertLayer> check_routed_experts_args(const at::Tensor& x, const at::Tensor& indices,
		const at::Tensor& weights, at::TensorList params, at::IntArrayRef activations, int64_t simnorm_dim) {
	TORCH_CHECK_VALUE(x.dim() == 2, "x must be 2-D [N, in], got ", x.dim(), " dimensions");
	const auto dt = x.scalar_type();
	TORCH_CHECK_VALUE(dt == at::kFloat || dt == at::kDouble, "x must be float32 or float64, got ", dt);
	TORCH_CHECK_VALUE(indices.device() == x.device(), "indices must be on the device of x (", x.device(), "), got ",
			indices.device());
	TORCH_CHECK_VALUE(indices.dim() == 2 && indices.size(0) == x.size(0) && indices.size(1) >= 1 &&
					indices.scalar_type() == at::kLong,
			"indices must be int64 [N=", x.size(0), ", k >= 1], got ", indices.scalar_type(), " ", indices.sizes());
	TORCH_CHECK_VALUE(weights.device() == x.device(), "weights must be on the device of x (", x.device(), "), got ",
			weights.device());
	TORCH_CHECK_VALUE(at::isFloatingType(weights.scalar_type()), "weights must be floating point, got ",
			weights.scalar_type());
	TORCH_CHECK_VALUE(weights.sizes() == indices.sizes(), "weights must have the shape of indices ", indices.sizes(),
			", got ", weights.sizes());
	TORCH_CHECK_VALUE(!activations.empty(), "activations must name at least one layer");
	std::vector<ExpertLayer> layers;
	int64_t next = 0, width = x.size(1), experts = -1;
	for (size_t l = 0; l < activations.size(); ++l) {
		const int64_t code = activations[l];
		TORCH_CHECK_VALUE(code >= 0 && code <= 2, "activations[", l, "] must be 0 (none), 1 (mish) or 2 (simnorm), got ",
				code);
		ExpertLayer layer{};
		layer.act = static_cast<ExpertAct>(code);
		const int64_t count = expert_params_of(layer.act);
		TORCH_CHECK_VALUE(next + count <= static_cast<int64_t>(params.size()), "params must hold ", count,
				" tensors for layer ", l, " (weight, bias", layer.normed() ? ", ln_weight, ln_bias" : "", "), got ",
				params.size(), " tensors for ", activations.size(), " layers");
		for (int64_t i = 0; i < count; ++i) {
			const at::Tensor& p = params[next + i];
			TORCH_CHECK_VALUE(p.device() == x.device(), "params[", next + i, "] (layer ", l, ") must be on the device of x (",
					x.device(), "), got ", p.device());
			TORCH_CHECK_VALUE(p.scalar_type() == dt, "params[", next + i, "] (layer ", l, ") must have the dtype of x (", dt,
					"), got ", p.scalar_type());
		}
		layer.weight = params[next];
		layer.bias = params[next + 1];
		TORCH_CHECK_VALUE(layer.weight.dim() == 3 && layer.weight.size(2) == width && layer.weight.size(0) >= 1 &&
						layer.weight.size(1) >= 1,
				"params[", next, "] (layer ", l, " weight) must be [E, out, in=", width, "], got ", layer.weight.sizes());
		if (experts < 0) experts = layer.weight.size(0);
		layer.in = width;
		layer.out = layer.weight.size(1);
		TORCH_CHECK_VALUE(layer.weight.size(0) == experts, "params[", next, "] (layer ", l, " weight) must have E=",
				experts, " experts as layer 0, got ", layer.weight.size(0));
		for (int64_t i = 1; i < count; ++i)
			TORCH_CHECK_VALUE(params[next + i].dim() == 2 && params[next + i].size(0) == experts &&
							params[next + i].size(1) == layer.out,
					"params[", next + i, "] (layer ", l, i == 1 ? " bias" : i == 2 ? " ln_weight" : " ln_bias",
					") must be [E=", experts, ", out=", layer.out, "], got ", params[next + i].sizes());
		if (layer.normed()) {
			layer.ln_weight = params[next + 2];
			layer.ln_bias = params[next + 3];
		}
		if (layer.act == ExpertAct::kSimNorm)
			TORCH_CHECK_VALUE(simnorm_dim >= 1 && layer.out % simnorm_dim == 0, "simnorm_dim must be >= 1 and divide "
					"layer ", l, "'s width ", layer.out, ", got ", simnorm_dim);
		layers.push_back(layer);
		next += count;
		width = layer.out;
	}
	TORCH_CHECK_VALUE(next == static_cast<int64_t>(params.size()), "params must hold ", next, " tensors for ",
			activations.size(), " layers, got ", params.size());
	return layers;
}

// Returns the sizes of `saved` (header comment) for rows x [N, in] routed to k experts each.
inline std::vector<std::vector<int64_t>> routed_experts_saved_sizes(int64_t n, int64_t k,
		const std::vector<ExpertLayer>& layers) {
	const int64_t s = n * k, e = layers[0].weight.size(0);
	std::vector<std::vector<int64_t>> sizes{{2 * s + e + 1}, {s, layers[0].in}};
	for (const ExpertLayer& layer : layers) sizes.push_back({s, layer.out});
	for (const ExpertLayer& layer : layers)
		if (layer.normed()) {
			sizes.push_back({s, layer.out});
			sizes.push_back({s});
		}
	return sizes;
}

// Checks the backward's arguments beyond the forward's: grad_out [N, out] and `saved` as the forward made it.
inline std::vector<ExpertLayer> check_routed_experts_backward_args(const at::Tensor& grad_out, const at::Tensor& x,
		const at::Tensor& indices, const at::Tensor& weights, at::TensorList params, at::TensorList saved,
		at::IntArrayRef activations, int64_t simnorm_dim) {
	std::vector<ExpertLayer> layers = check_routed_experts_args(x, indices, weights, params, activations, simnorm_dim);
	TORCH_CHECK_VALUE(grad_out.device() == x.device(), "grad_out must be on the device of x (", x.device(), "), got ",
			grad_out.device());
	TORCH_CHECK_VALUE(at::isFloatingType(grad_out.scalar_type()), "grad_out must be floating point, got ",
			grad_out.scalar_type());
	TORCH_CHECK_VALUE(grad_out.dim() == 2 && grad_out.size(0) == x.size(0) && grad_out.size(1) == layers.back().out,
			"grad_out must be [N=", x.size(0), ", out=", layers.back().out, "], got ", grad_out.sizes());
	const auto sizes = routed_experts_saved_sizes(x.size(0), indices.size(1), layers);
	TORCH_CHECK_VALUE(saved.size() == sizes.size(), "saved must hold ", sizes.size(), " tensors, got ", saved.size());
	for (size_t i = 0; i < sizes.size(); ++i) {
		const auto want = i == 0 ? at::kLong : x.scalar_type();
		TORCH_CHECK_VALUE(saved[i].device() == x.device() && saved[i].scalar_type() == want &&
						saved[i].sizes() == at::IntArrayRef(sizes[i]) && saved[i].is_contiguous(),
				"saved[", i, "] must be a contiguous ", want, " tensor ", at::IntArrayRef(sizes[i]), " on ", x.device(),
				", got ", saved[i].scalar_type(), " ", saved[i].sizes(), " on ", saved[i].device());
	}
	return layers;
}

}  // namespace tdmpc2_moe
