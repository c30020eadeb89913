// The routed-experts CUDA operators from tensors to the launchers (routed_experts_launch.h): argument checks
// (routed_experts.h, the CPU kernel's own), outputs, the layout of `saved` (the same tensors as the CPU
// kernel's, so either backward reads either forward's), the workspace and the launcher calls. One copy for
// the CUDA extension (routed_experts_binding.cpp: device guard, current stream) and the emulator's test
// build (tests/ops/emulator/emulated_experts_ops.cpp: CPU tensors on the SIMT emulator), through the
// `Build` policy of binding_impl.h. Host code, never included by a .cu; like binding_impl.h it includes no
// ATen header itself (allocations are Tensor methods).
//
// Nothing here reads a tensor's values on the host (that would synchronise with the device): in
// particular the indices are not range-checked, see routed_experts_launch.h for what an index outside
// [0, E) does on CUDA (the CPU kernel raises ValueError).
#pragma once

// The checks (torch) first: in the emulator build launch.h brings HIP-CPU's macros, which torch's headers
// must not see.
#include "../routed_experts.h"

#include "binding_impl.h"
#include "routed_experts_launch.h"

#include <algorithm>
#include <tuple>
#include <vector>

namespace tdmpc2_moe::binding {

// Parameters contiguous (the kernels index them densely), in the dtype of x (checked).
inline ExpertLayerArgs expert_layer_args(const ExpertLayer& layer, std::vector<at::Tensor>& keep) {
	const auto dense = [&](const at::Tensor& t) -> const void* {
		if (!t.defined()) return nullptr;
		keep.push_back(t.contiguous());
		return keep.back().const_data_ptr();
	};
	ExpertLayerArgs a{};
	a.weight = dense(layer.weight);
	a.bias = dense(layer.bias);
	a.gamma = dense(layer.ln_weight);
	a.beta = dense(layer.ln_bias);
	a.act = static_cast<int>(layer.act);
	a.in = layer.in;
	a.out = layer.out;
	return a;
}

inline int64_t widest(const std::vector<ExpertLayer>& layers) {
	int64_t w = layers[0].in;
	for (const ExpertLayer& layer : layers) w = std::max(w, layer.out);
	return w;
}

// The int64 scratch of the launchers.
template <class Build>
at::Tensor experts_sort_work(const at::Tensor& x, int64_t s, int64_t e) {
	return Build::workspace(x, {routed_experts_sort_work(s, static_cast<int>(e))}, at::kLong);
}

// The fields ExpertsForwardParams and ExpertsBackwardParams share: the routing (contiguous `indices` and
// `weights` in x's dtype), the sizes, the layers and the sort's scratch `work`.
template <class Params>
void fill_shared_params(Params& p, const at::Tensor& x, const at::Tensor& indices, const at::Tensor& weights,
		int64_t n_experts, int64_t simnorm_dim, const std::vector<ExpertLayerArgs>& args, const at::Tensor& work) {
	p.f64 = x.scalar_type() == at::kDouble;
	p.indices = indices.const_data_ptr<int64_t>();
	p.weights = weights.const_data_ptr();
	p.n = x.size(0);
	p.k = static_cast<int>(indices.size(1));
	p.e = static_cast<int>(n_experts);
	p.group = static_cast<int>(simnorm_dim);
	p.layers = args.data();
	p.n_layers = static_cast<int>(args.size());
	p.work = work.data_ptr<int64_t>();
}

// The forward; with `saved` (training) fills it as routed_experts.h lays it out, else keeps the grouping
// and every layer's output in workspace.
template <class Build>
at::Tensor experts_forward(const at::Tensor& x_in, const at::Tensor& indices_in, const at::Tensor& weights_in,
		at::TensorList params, at::IntArrayRef activations, int64_t simnorm_dim, std::vector<at::Tensor>* saved) {
	const std::vector<ExpertLayer> layers =
			check_routed_experts_args(x_in, indices_in, weights_in, params, activations, simnorm_dim);
	const typename Build::Guard guard(x_in.device());
	const at::Tensor& x = x_in;  // read through its strides
	const at::Tensor indices = indices_in.contiguous();
	const at::Tensor weights = weights_in.to(x.scalar_type()).contiguous();
	const int64_t n = x.size(0), k = indices.size(1), s = n * k, e = layers[0].weight.size(0);
	const int64_t n_layers = static_cast<int64_t>(layers.size()), width = layers.back().out;
	std::vector<at::Tensor> keep;
	std::vector<ExpertLayerArgs> args;
	for (const ExpertLayer& layer : layers) args.push_back(expert_layer_args(layer, keep));
	at::Tensor table;
	std::vector<at::Tensor> hs, norms;
	if (saved) {
		const auto sizes = routed_experts_saved_sizes(n, k, layers);
		table = x.new_empty(sizes[0], x.options().dtype(at::kLong));
		for (int64_t l = 0; l <= n_layers; ++l) hs.push_back(x.new_empty(sizes[1 + l]));
		for (size_t i = 2 + n_layers; i < sizes.size(); ++i) norms.push_back(x.new_empty(sizes[i]));
	} else {
		// Inference: the grouping, the gathered rows, two buffers for the hidden layers and the experts' outputs.
		table = Build::workspace(x, {2 * s + e + 1}, at::kLong);
		const int64_t wide = widest(layers);
		const at::Tensor buf = Build::workspace(x, {s * (layers[0].in + 2 * wide + width)}, x.scalar_type());
		hs.push_back(buf.narrow(0, 0, s * layers[0].in));
		for (int64_t l = 0; l < n_layers; ++l) {
			const int64_t at = l == n_layers - 1 ? s * (layers[0].in + 2 * wide) : s * (layers[0].in + (l % 2) * wide);
			hs.push_back(buf.narrow(0, at, s * layers[l].out));
		}
	}
	for (int64_t l = 0, q = 0; l < n_layers; ++l) {
		args[l].h_in = hs[l].const_data_ptr();
		args[l].h_out = hs[l + 1].data_ptr();
		if (saved && layers[l].normed()) {
			args[l].xhat = norms[2 * q].data_ptr();
			args[l].rstd = norms[2 * q + 1].data_ptr();
			++q;
		}
	}
	at::Tensor out = x.new_empty({n, width});
	const at::Tensor work = experts_sort_work<Build>(x, s, e);
	ExpertsForwardParams p{};
	fill_shared_params(p, x, indices, weights, e, simnorm_dim, args, work);
	p.x = x.const_data_ptr();
	p.x_row = x.stride(0);
	p.x_col = x.stride(1);
	p.table = table.data_ptr<int64_t>();
	p.out = out.data_ptr();
	Build::check_launch(launch_routed_experts_forward(p, Build::stream()));
	if (saved) {
		saved->push_back(table);
		for (at::Tensor& h : hs) saved->push_back(h);
		for (at::Tensor& t : norms) saved->push_back(t);
	}
	return out;
}

template <class Build>
at::Tensor routed_experts(const at::Tensor& x, const at::Tensor& indices, const at::Tensor& weights,
		at::TensorList params, at::IntArrayRef activations, int64_t simnorm_dim) {
	return experts_forward<Build>(x, indices, weights, params, activations, simnorm_dim, nullptr);
}

template <class Build>
std::tuple<at::Tensor, std::vector<at::Tensor>> routed_experts_train(const at::Tensor& x, const at::Tensor& indices,
		const at::Tensor& weights, at::TensorList params, at::IntArrayRef activations, int64_t simnorm_dim) {
	std::vector<at::Tensor> saved;
	at::Tensor out = experts_forward<Build>(x, indices, weights, params, activations, simnorm_dim, &saved);
	return {out, saved};
}

template <class Build>
std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> routed_experts_backward(const at::Tensor& grad_out_in,
		const at::Tensor& x, const at::Tensor& indices_in, const at::Tensor& weights_in, at::TensorList params,
		at::TensorList saved, at::IntArrayRef activations, int64_t simnorm_dim, bool input_grad) {
	const std::vector<ExpertLayer> layers = check_routed_experts_backward_args(grad_out_in, x, indices_in, weights_in,
			params, saved, activations, simnorm_dim);
	const typename Build::Guard guard(x.device());
	const at::Tensor grad_out = grad_out_in.to(x.scalar_type()).contiguous();
	const at::Tensor indices = indices_in.contiguous();
	const at::Tensor weights = weights_in.to(x.scalar_type()).contiguous();
	const int64_t n = x.size(0), k = indices.size(1), s = n * k, e = layers[0].weight.size(0);
	const int64_t n_layers = static_cast<int64_t>(layers.size()), in = layers[0].in;
	std::vector<at::Tensor> keep, grad_params;
	std::vector<ExpertLayerArgs> args;
	const int64_t saved_norms = 2 + n_layers;
	for (int64_t l = 0, q = 0; l < n_layers; ++l) {
		const ExpertLayer& layer = layers[l];
		ExpertLayerArgs a = expert_layer_args(layer, keep);
		a.h_in = saved[1 + l].const_data_ptr();
		a.h_out = const_cast<void*>(saved[2 + l].const_data_ptr());  // read only
		// Every element of every gradient is written by the kernels (zeros for an expert without rows).
		grad_params.push_back(x.new_empty(layer.weight.sizes()));
		a.grad_weight = grad_params.back().data_ptr();
		grad_params.push_back(x.new_empty(layer.bias.sizes()));
		a.grad_bias = grad_params.back().data_ptr();
		if (layer.normed()) {
			a.xhat = const_cast<void*>(saved[saved_norms + 2 * q].const_data_ptr());
			a.rstd = const_cast<void*>(saved[saved_norms + 2 * q + 1].const_data_ptr());
			++q;
			grad_params.push_back(x.new_empty(layer.ln_weight.sizes()));
			a.grad_gamma = grad_params.back().data_ptr();
			grad_params.push_back(x.new_empty(layer.ln_bias.sizes()));
			a.grad_beta = grad_params.back().data_ptr();
		}
		args.push_back(a);
	}
	at::Tensor grad_x = input_grad ? x.new_empty({n, in}) : x.new_empty({0});
	at::Tensor grad_weights = x.new_empty({n, k});
	const int64_t wide = widest(layers);
	const at::Tensor buf = Build::workspace(x, {s * (3 * wide + (input_grad ? in : 0))}, x.scalar_type());
	const at::Tensor work = experts_sort_work<Build>(x, s, e);
	ExpertsBackwardParams p{};
	fill_shared_params(p, x, indices, weights, e, simnorm_dim, args, work);
	p.grad_out = grad_out.const_data_ptr();
	p.table = saved[0].const_data_ptr<int64_t>();
	p.grad_x = input_grad ? grad_x.data_ptr() : nullptr;
	p.grad_weights = grad_weights.data_ptr();
	char* base = static_cast<char*>(buf.data_ptr());
	const size_t elem = buf.element_size();
	p.grad_a = base;
	p.grad_b = base + elem * s * wide;
	p.grad_affine = base + elem * 2 * s * wide;
	p.grad_h0 = input_grad ? base + elem * 3 * s * wide : nullptr;
	Build::check_launch(launch_routed_experts_backward(p, Build::stream()));
	return {grad_x, grad_weights.to(weights_in.scalar_type()), grad_params};
}

}  // namespace tdmpc2_moe::binding
