// CPU kernels of top-k gating and their registration: outputs, the lane kernels (lanes.h) over
// blocks of rows in parallel with at::parallel_for, the ring write and the statistics' totals.
#include "topk_gate.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../gate_row.h"
#include "lanes.h"

namespace tdmpc2_moe {
namespace {

// Rows per parallel chunk: at least this many logits, so that waking threads costs less than the
// work, and a whole number of lane blocks.
constexpr int64_t kGrainElements = 32768;

int64_t grain_rows(int64_t e) {
	const int64_t rows = std::max<int64_t>(kLaneRows, kGrainElements / e);
	return (rows + kLaneRows - 1) / kLaneRows * kLaneRows;
}

template <typename T>
struct CpuCvt {
	static T from_float(float v) { return static_cast<T>(v); }
};

// Writes rows [begin, end) of the call's routing (weights, indices) into the ring at cursor.
template <typename TRing>
void write_ring(TRing* ring, int64_t capacity, int64_t cursor, int64_t begin, int64_t end, int64_t n, int e, int k,
		const float* weights, const int64_t* indices) {
	for (int64_t r = std::max(begin, n - capacity); r < end; ++r) {
		int64_t pos;
		if (gate_ring_slot(cursor, r, n, capacity, &pos))
			gate_ring_write<CpuCvt<TRing>>(ring + pos * e, e, weights + r * k, indices + r * k, k);
	}
}

GateOutputs forward(const at::Tensor& logits_in, int64_t k, double temperature, bool renormalize, at::Tensor* ring,
		at::Tensor* cursor) {
	check_gate_args(logits_in, k, temperature);
	if (ring) check_ring_args(logits_in, *ring, *cursor);
	// The kernels compute in float32: other dtypes are converted once, up front.
	const at::Tensor logits = logits_in.to(at::kFloat).contiguous();
	const int64_t n = logits.size(0);
	const int e = static_cast<int>(logits.size(1));
	const auto f32 = logits.options();
	at::Tensor weights = at::empty({n, k}, f32);
	at::Tensor indices = at::empty({n, k}, f32.dtype(at::kLong));
	at::Tensor prob_mean = at::empty({e}, f32);
	at::Tensor frac = at::empty({e}, f32);
	at::Tensor lse = at::empty({n}, f32);

	// Statistics per fixed chunk of grain_rows(e) rows (double sums of probabilities, pick counts),
	// added up in chunk order afterwards: the result does not depend on the number of threads.
	const int64_t grain = grain_rows(e);
	const int64_t chunks = std::max<int64_t>((n + grain - 1) / grain, 1);
	std::vector<double> prob_sum(static_cast<size_t>(chunks) * e, 0.0);
	std::vector<int64_t> counts(static_cast<size_t>(chunks) * e, 0);
	LaneForward args{logits.const_data_ptr<float>(), n, e, static_cast<int>(k), check_temperature(temperature),
			renormalize, weights.data_ptr<float>(), indices.data_ptr<int64_t>(), lse.data_ptr<float>(), nullptr, nullptr};
	const int64_t ring_cursor = ring ? cursor->data_ptr<int64_t>()[0] : 0;
	const LaneKernels& kernels = lane_kernels();
	auto chunk = [&](int64_t c) {
		const int64_t begin = c * grain, end = std::min(n, begin + grain);
		LaneForward a = args;
		a.prob_sum = prob_sum.data() + static_cast<size_t>(c) * e;
		a.counts = counts.data() + static_cast<size_t>(c) * e;
		kernels.forward(a, begin, end);
		if (!ring) return;
		const auto rt = ring->scalar_type();
		if (rt == at::kBFloat16)
			write_ring(ring->data_ptr<at::BFloat16>(), ring->size(0), ring_cursor, begin, end, n, e, a.k, a.weights,
					a.indices);
		else if (rt == at::kHalf)
			write_ring(ring->data_ptr<at::Half>(), ring->size(0), ring_cursor, begin, end, n, e, a.k, a.weights,
					a.indices);
		else
			write_ring(ring->data_ptr<float>(), ring->size(0), ring_cursor, begin, end, n, e, a.k, a.weights, a.indices);
	};
	if (chunks == 1)
		chunk(0);
	else
		at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
			for (int64_t c = begin; c < end; ++c) chunk(c);
		});

	const double nrows = static_cast<double>(std::max<int64_t>(n, 1));
	float* pm = prob_mean.data_ptr<float>();
	float* fr = frac.data_ptr<float>();
	for (int j = 0; j < e; ++j) {
		double p = 0.0;
		int64_t c = 0;
		for (int64_t t = 0; t < chunks; ++t) {
			p += prob_sum[static_cast<size_t>(t) * e + j];
			c += counts[static_cast<size_t>(t) * e + j];
		}
		pm[j] = static_cast<float>(p / nrows);
		fr[j] = static_cast<float>(static_cast<double>(c) / (nrows * static_cast<double>(k)));
	}
	if (cursor) cursor->data_ptr<int64_t>()[0] += n;
	return {weights, indices, prob_mean, frac, lse};
}

}  // namespace

GateOutputs topk_gate_cpu(const at::Tensor& logits, int64_t k, double temperature, bool renormalize) {
	return forward(logits, k, temperature, renormalize, nullptr, nullptr);
}

GateOutputs topk_gate_record_cpu(const at::Tensor& logits, int64_t k, double temperature, bool renormalize,
		at::Tensor& ring, at::Tensor& cursor) {
	return forward(logits, k, temperature, renormalize, &ring, &cursor);
}

at::Tensor topk_gate_backward_cpu(const std::optional<at::Tensor>& grad_weights_in,
		const std::optional<at::Tensor>& grad_prob_mean_in, const std::optional<at::Tensor>& grad_lse_in,
		const at::Tensor& logits_in, const at::Tensor& indices_in, double temperature, bool renormalize) {
	// The lane kernels read grad_weights and grad_lse at their strides (no copy of expanded gradients).
	const auto [gw, gpm, glse] = check_backward_args(grad_weights_in, grad_prob_mean_in, grad_lse_in, logits_in,
			indices_in, temperature, /*keep_strides=*/true);
	const at::Tensor logits = logits_in.to(at::kFloat).contiguous();
	const at::Tensor indices = indices_in.contiguous();
	const int64_t n = logits.size(0);
	const int e = static_cast<int>(logits.size(1));
	const int k = static_cast<int>(indices.size(1));
	at::Tensor grad = at::empty({n, e}, logits.options());
	std::vector<float> zeros(gpm.defined() ? 0 : e, 0.f);
	const LaneBackward args{logits.const_data_ptr<float>(), grad.data_ptr<float>(),
			gw.defined() ? gw.const_data_ptr<float>() : nullptr, gpm.defined() ? gpm.const_data_ptr<float>() : zeros.data(),
			glse.defined() ? glse.const_data_ptr<float>() : nullptr,
			{gw.defined() ? gw.stride(0) : 0, gw.defined() ? gw.stride(1) : 0}, glse.defined() ? glse.stride(0) : 0,
			indices.const_data_ptr<int64_t>(), n, e, k, static_cast<float>(temperature),
			1.f / static_cast<float>(std::max<int64_t>(n, 1)), renormalize};
	const LaneKernels& kernels = lane_kernels();
	if (n <= grain_rows(e))
		kernels.backward(args, 0, n);
	else
		at::parallel_for(0, n, grain_rows(e), [&](int64_t begin, int64_t end) { kernels.backward(args, begin, end); });
	if (logits_in.scalar_type() != at::kFloat) grad = grad.to(logits_in.scalar_type());
	return grad;
}

}  // namespace tdmpc2_moe

TORCH_LIBRARY_IMPL(tdmpc2_moe, CPU, m) {
	m.impl("topk_gate", &tdmpc2_moe::topk_gate_cpu);
	m.impl("topk_gate_record", &tdmpc2_moe::topk_gate_record_cpu);
	m.impl("topk_gate_backward", &tdmpc2_moe::topk_gate_backward_cpu);
}
