// CPU kernels of top-k gating: a row loop over gate_row.h, parallel over rows with at::parallel_for.
#include "topk_gate.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../gate_row.h"

namespace tdmpc2_moe {
namespace {

// Largest k served by selection passes (k scans of the row); above it a partial sort is cheaper.
constexpr int kMaxSelectionK = 2;
// Rows per parallel chunk is chosen so that a chunk holds at least this many logits: below that,
// waking threads costs more than the work.
constexpr int64_t kGrainElements = 32768;

template <typename T>
struct CpuCvt {
	static T from_float(float v) { return static_cast<T>(v); }
};

// Statistics of one contiguous block of rows, summed in double so means over 10^5 rows stay exact
// to float precision.
struct RowStats {
	std::vector<double> prob_sum;
	std::vector<int64_t> counts;
	explicit RowStats(int e) : prob_sum(e, 0.0), counts(e, 0) {}
};

struct RingView {
	void* data = nullptr;
	int64_t capacity = 0;
	int64_t cursor = 0;
};

// Loads row r divided by the temperature into x, padding x[e..EB) with -inf (gate_softmax contract).
template <int EB, typename TIn>
inline void load_row(const TIn* src, int e, float t, float* x) {
	for (int j = 0; j < e; ++j) x[j] = static_cast<float>(src[j]) / t;
	if constexpr (EB > 0)
		for (int j = e; j < EB; ++j) x[j] = -INFINITY;
}

// Top-k of row p for k above kMaxSelectionK: a partial sort of expert ids in routing order.
inline float topk_sorted(const float* p, int e, int k, int* order, float* w, int64_t* idx) {
	for (int j = 0; j < e; ++j) order[j] = j;
	std::partial_sort(order, order + k, order + e, [p](int a, int b) { return gate_before(p[a], a, p[b], b); });
	float sum = 0.f;
	for (int j = 0; j < k; ++j) {
		w[j] = p[order[j]];
		idx[j] = order[j];
		sum += w[j];
	}
	return sum;
}

template <int EB, typename TIn, typename TRing>
void forward_rows(const TIn* logits, int64_t begin, int64_t end, int64_t n, int e, int k, float t, bool renormalize,
		float* weights, int64_t* indices, float* lse, RowStats& stats, const RingView& ring) {
	constexpr int kRow = EB > 0 ? EB : 1024;
	float x[kRow];
	double prob_sum[kRow] = {};
	int64_t counts[kRow] = {};
	int order[EB > 0 ? 1 : 1024];
	for (int64_t r = begin; r < end; ++r) {
		load_row<EB>(logits + r * e, e, t, x);
		lse[r] = gate_softmax<EB>(x, e);
		for (int j = 0; j < e; ++j) prob_sum[j] += x[j];
		float* w = weights + r * k;
		int64_t* idx = indices + r * k;
		float sum;
		if constexpr (EB > 0)
			// Ranking costs EB^2 compares whatever k; selection passes cost 2 * k * EB.
			sum = (EB <= 8 || k > kMaxSelectionK) ? gate_topk_ranked<EB>(x, e, k, w, idx) : gate_topk<EB>(x, e, k, w, idx);
		else
			sum = k <= kMaxSelectionK ? gate_topk<0>(x, e, k, w, idx) : topk_sorted(x, e, k, order, w, idx);
		if (renormalize) gate_renormalize(w, k, sum);
		for (int j = 0; j < k; ++j) ++counts[idx[j]];
		int64_t pos;
		if (ring.data && gate_ring_slot(ring.cursor, r, n, ring.capacity, &pos))
			gate_ring_write<CpuCvt<TRing>>(static_cast<TRing*>(ring.data) + pos * e, e, w, idx, k);
	}
	for (int j = 0; j < e; ++j) {
		stats.prob_sum[j] += prob_sum[j];
		stats.counts[j] += counts[j];
	}
}

// Dispatches on the compile-time E bucket and runs forward_rows over [begin, end).
template <typename TIn, typename TRing>
void forward_block(const TIn* logits, int64_t begin, int64_t end, int64_t n, int e, int k, float t, bool renormalize,
		float* weights, int64_t* indices, float* lse, RowStats& stats, const RingView& ring) {
	if (e <= 4)
		forward_rows<4, TIn, TRing>(logits, begin, end, n, e, k, t, renormalize, weights, indices, lse, stats, ring);
	else if (e <= 8)
		forward_rows<8, TIn, TRing>(logits, begin, end, n, e, k, t, renormalize, weights, indices, lse, stats, ring);
	else if (e <= 16)
		forward_rows<16, TIn, TRing>(logits, begin, end, n, e, k, t, renormalize, weights, indices, lse, stats, ring);
	else if (e <= 32)
		forward_rows<32, TIn, TRing>(logits, begin, end, n, e, k, t, renormalize, weights, indices, lse, stats, ring);
	else
		forward_rows<0, TIn, TRing>(logits, begin, end, n, e, k, t, renormalize, weights, indices, lse, stats, ring);
}

int64_t grain_rows(int64_t e) {
	return std::max<int64_t>(1, kGrainElements / e);
}

GateOutputs forward(const at::Tensor& logits_in, int64_t k, double temperature, bool renormalize, at::Tensor* ring,
		at::Tensor* cursor) {
	check_gate_args(logits_in, k, temperature);
	if (ring) check_ring_args(logits_in, *ring, *cursor);
	const at::Tensor logits = logits_in.contiguous();
	const int64_t n = logits.size(0);
	const int e = static_cast<int>(logits.size(1));
	const auto f32 = logits.options().dtype(at::kFloat);
	at::Tensor weights = at::empty({n, k}, f32);
	at::Tensor indices = at::empty({n, k}, logits.options().dtype(at::kLong));
	at::Tensor prob_mean = at::empty({e}, f32);
	at::Tensor frac = at::empty({e}, f32);
	at::Tensor lse = at::empty({n}, f32);

	RingView view;
	if (ring) {
		view.data = ring->data_ptr();
		view.capacity = ring->size(0);
		view.cursor = cursor->data_ptr<int64_t>()[0];
	}
	const int threads = at::get_num_threads();
	std::vector<RowStats> partial(threads, RowStats(e));
	const float t = static_cast<float>(temperature);
	AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "topk_gate_cpu", [&] {
		const scalar_t* src = logits.const_data_ptr<scalar_t>();
		auto run = [&](auto ring_tag) {
			using TRing = decltype(ring_tag);
			at::parallel_for(0, n, grain_rows(e), [&](int64_t begin, int64_t end) {
				RowStats& stats = partial[at::get_thread_num()];
				forward_block<scalar_t, TRing>(src, begin, end, n, e, static_cast<int>(k), t, renormalize,
						weights.data_ptr<float>(), indices.data_ptr<int64_t>(), lse.data_ptr<float>(), stats, view);
			});
		};
		const auto ring_type = ring ? ring->scalar_type() : at::kFloat;
		if (ring_type == at::kBFloat16)
			run(at::BFloat16());
		else if (ring_type == at::kHalf)
			run(at::Half());
		else
			run(float());
	});

	const double rows = static_cast<double>(std::max<int64_t>(n, 1));
	float* pm = prob_mean.data_ptr<float>();
	float* fr = frac.data_ptr<float>();
	for (int j = 0; j < e; ++j) {
		double p = 0.0;
		int64_t c = 0;
		for (const RowStats& s : partial) {
			p += s.prob_sum[j];
			c += s.counts[j];
		}
		pm[j] = static_cast<float>(p / rows);
		fr[j] = static_cast<float>(static_cast<double>(c) / (rows * static_cast<double>(k)));
	}
	if (cursor) cursor->data_ptr<int64_t>()[0] += n;
	return {weights, indices, prob_mean, frac, lse};
}

struct BackwardArgs {
	const float* grad_weights;  // [N, k] or null (zero)
	const float* grad_prob_mean;  // [E] or null (zero)
	const float* grad_lse;  // [N] or null (zero)
	const int64_t* indices;
	int e, k;
	float t, inv_rows;
	bool renormalize;
};

template <int EB, typename TIn>
void backward_rows(const TIn* logits, TIn* grad_logits, int64_t begin, int64_t end, const BackwardArgs& a) {
	float p[EB > 0 ? EB : 1024], out[EB > 0 ? EB : 1024], gpm[1024] = {}, zeros_k[1024] = {};
	if (a.grad_prob_mean)
		for (int j = 0; j < a.e; ++j) gpm[j] = a.grad_prob_mean[j];
	for (int64_t r = begin; r < end; ++r) {
		load_row<EB>(logits + r * a.e, a.e, a.t, p);
		const float* gw = a.grad_weights ? a.grad_weights + r * a.k : zeros_k;
		gate_row_backward<EB>(p, out, a.e, a.k, gw, a.indices + r * a.k, gpm, a.inv_rows,
				a.grad_lse ? a.grad_lse[r] : 0.f, a.renormalize, 1.f / a.t);
		TIn* dst = grad_logits + r * a.e;
		for (int j = 0; j < a.e; ++j) dst[j] = static_cast<TIn>(out[j]);
	}
}

}  // namespace

void check_gate_args(const at::Tensor& logits, int64_t k, double temperature) {
	TORCH_CHECK_VALUE(logits.dim() == 2, "logits must be 2-D [N, E], got ", logits.dim(), " dimensions");
	const auto dt = logits.scalar_type();
	TORCH_CHECK_VALUE(at::isFloatingType(dt), "logits must be floating point, got ", dt);
	const int64_t e = logits.size(1);
	TORCH_CHECK_VALUE(e >= 1 && e <= 1024, "logits must have 1..1024 experts (columns), got ", e);
	TORCH_CHECK_VALUE(k >= 1 && k <= e, "k must be in 1..E=", e, ", got ", k);
	TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0, "temperature must be finite and > 0, got ",
			temperature);
}

void check_ring_args(const at::Tensor& logits, const at::Tensor& ring, const at::Tensor& cursor) {
	TORCH_CHECK_VALUE(ring.dim() == 2 && ring.size(1) == logits.size(1) && ring.size(0) >= 1,
			"ring must be [capacity, E=", logits.size(1), "], got ", ring.sizes());
	TORCH_CHECK_VALUE(ring.is_contiguous(), "ring must be contiguous");
	const auto dt = ring.scalar_type();
	TORCH_CHECK_VALUE(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
			"ring must be float32, bfloat16 or float16, got ", dt);
	TORCH_CHECK_VALUE(cursor.numel() == 1 && cursor.scalar_type() == at::kLong, "cursor must be one int64, got ",
			cursor.sizes(), " ", cursor.scalar_type());
	TORCH_CHECK_VALUE(ring.device() == logits.device() && cursor.device() == logits.device(),
			"ring and cursor must be on the device of logits (", logits.device(), "), got ", ring.device(), " and ",
			cursor.device());
}

GateOutputs topk_gate_cpu(const at::Tensor& logits, int64_t k, double temperature, bool renormalize) {
	return forward(logits, k, temperature, renormalize, nullptr, nullptr);
}

GateOutputs topk_gate_record_cpu(const at::Tensor& logits, int64_t k, double temperature, bool renormalize,
		at::Tensor& ring, at::Tensor& cursor) {
	return forward(logits, k, temperature, renormalize, &ring, &cursor);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> check_backward_args(const std::optional<at::Tensor>& grad_weights,
		const std::optional<at::Tensor>& grad_prob_mean, const std::optional<at::Tensor>& grad_lse,
		const at::Tensor& logits, const at::Tensor& indices, double temperature) {
	TORCH_CHECK_VALUE(indices.dim() == 2, "indices must be 2-D [N, k], got ", indices.sizes());
	check_gate_args(logits, indices.size(1), temperature);
	const int64_t n = logits.size(0), e = logits.size(1);
	TORCH_CHECK_VALUE(indices.size(0) == n && indices.scalar_type() == at::kLong,
			"indices must be int64 [N=", n, ", k], got ", indices.scalar_type(), " ", indices.sizes());
	auto as_float = [&](const std::optional<at::Tensor>& g, at::IntArrayRef shape, const char* name) {
		if (!g.has_value() || !g->defined()) return at::Tensor();
		TORCH_CHECK_VALUE(g->sizes() == shape, name, " must have shape ", shape, ", got ", g->sizes());
		TORCH_CHECK_VALUE(g->device() == logits.device(), name, " must be on ", logits.device());
		return g->to(at::kFloat).contiguous();
	};
	return {as_float(grad_weights, indices.sizes(), "grad_weights"), as_float(grad_prob_mean, {e}, "grad_prob_mean"),
			as_float(grad_lse, {n}, "grad_lse")};
}

at::Tensor topk_gate_backward_cpu(const std::optional<at::Tensor>& grad_weights_in,
		const std::optional<at::Tensor>& grad_prob_mean_in, const std::optional<at::Tensor>& grad_lse_in,
		const at::Tensor& logits_in, const at::Tensor& indices_in, double temperature, bool renormalize) {
	const auto [gw, gpm, glse] =
			check_backward_args(grad_weights_in, grad_prob_mean_in, grad_lse_in, logits_in, indices_in, temperature);
	const at::Tensor logits = logits_in.contiguous();
	const at::Tensor indices = indices_in.contiguous();
	const int64_t n = logits.size(0);
	const int e = static_cast<int>(logits.size(1));
	const int k = static_cast<int>(indices.size(1));
	at::Tensor grad = at::empty_like(logits, at::MemoryFormat::Contiguous);
	const BackwardArgs args{gw.defined() ? gw.const_data_ptr<float>() : nullptr,
			gpm.defined() ? gpm.const_data_ptr<float>() : nullptr, glse.defined() ? glse.const_data_ptr<float>() : nullptr,
			indices.const_data_ptr<int64_t>(), e, k, static_cast<float>(temperature),
			1.f / static_cast<float>(std::max<int64_t>(n, 1)), renormalize};
	AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "topk_gate_backward_cpu", [&] {
		const scalar_t* src = logits.const_data_ptr<scalar_t>();
		scalar_t* dst = grad.data_ptr<scalar_t>();
		at::parallel_for(0, n, grain_rows(e), [&](int64_t begin, int64_t end) {
			if (e <= 4)
				backward_rows<4>(src, dst, begin, end, args);
			else if (e <= 8)
				backward_rows<8>(src, dst, begin, end, args);
			else if (e <= 16)
				backward_rows<16>(src, dst, begin, end, args);
			else if (e <= 32)
				backward_rows<32>(src, dst, begin, end, args);
			else
				backward_rows<0>(src, dst, begin, end, args);
		});
	});
	return grad;
}

}  // namespace tdmpc2_moe
