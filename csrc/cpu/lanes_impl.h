// The lane kernels of lanes.h, included once per instruction set by lanes_<isa>.cpp with
// TDMPC2_LANES_NS naming a namespace of its own (so no inline function or template instance is
// shared between the instruction sets at link time). Every loop over l (the rows of a block) is the
// vectorised one; the scalar steps are those of gate_row.h (gate_exp, gate_key, gate_lse, gate_index,
// gate_backward_shift, gate_pick_grad), the loops apply the row algorithm of gate_softmax,
// gate_select_next and gate_row_backward to 16 rows at once.
// This header includes nothing that defines inline code besides gate_row.h, whose functions are
// always inlined.
#include <math.h>
#include <stdint.h>

#include "../gate_row.h"
#include "lanes.h"

namespace tdmpc2_moe {
namespace TDMPC2_LANES_NS {
namespace {

constexpr int L = kLaneRows;
// Blocks between two flushes of the float lane sums of probabilities into the double totals: a lane
// adds at most this many probabilities in float.
constexpr int kFlushBlocks = 64;

// Transposes rows r0..r0+L of src [n, e] divided by t into x (rows past n repeat row n-1, so
// every lane holds a real row; their results are dropped).
inline void load_block(const float* __restrict src, int64_t r0, int64_t n, int e, float t, float* __restrict x) {
	int64_t off[L];
	for (int l = 0; l < L; ++l) off[l] = (r0 + l < n ? r0 + l : n - 1) * e;
	if (t == 1.f) {
		for (int j = 0; j < e; ++j)
			for (int l = 0; l < L; ++l) x[j * L + l] = src[off[l] + j];
	} else {
		for (int j = 0; j < e; ++j)
			for (int l = 0; l < L; ++l) x[j * L + l] = src[off[l] + j] / t;
	}
}

// gate_softmax for the L rows of x, in place. Writes each row's max to m and its sum of exp to s.
// With psum, also adds each probability times valid[l] (1 for the block's rows, 0 for padding
// lanes) to psum (same layout as x). The block helpers are kept out of line: inlined into the row
// loops, gcc stops vectorising them.
__attribute__((noinline)) void softmax_block(float* __restrict x, int e, float* __restrict m, float* __restrict s,
		float* __restrict psum, const float* __restrict valid) {
	for (int l = 0; l < L; ++l) {
		m[l] = -INFINITY;
		s[l] = 0.f;
	}
	// NaN never wins the max (as gate_row_max): a NaN row's max is -inf, its probabilities NaN.
	for (int j = 0; j < e; ++j)
		for (int l = 0; l < L; ++l) m[l] = x[j * L + l] > m[l] ? x[j * L + l] : m[l];
	for (int j = 0; j < e; ++j)
		for (int l = 0; l < L; ++l) {
			const float v = gate_exp(x[j * L + l] - m[l]);
			x[j * L + l] = v;
			s[l] += v;
		}
	float inv[L];
	for (int l = 0; l < L; ++l) inv[l] = 1.f / s[l];
	if (psum) {
		for (int j = 0; j < e; ++j)
			for (int l = 0; l < L; ++l) {
				const float v = x[j * L + l] * inv[l];
				x[j * L + l] = v;
				psum[j * L + l] += v * valid[l];
			}
	} else {
		for (int j = 0; j < e; ++j)
			for (int l = 0; l < L; ++l) x[j * L + l] *= inv[l];
	}
}

// The next expert after (pk, pi) in routing order for each row (gate_select_next): one pass in
// ascending expert order keeps the largest key, the first one seen winning ties (the lower index).
// pi < 0 means "no previous pick" (pk = +inf). Writes the expert to pi, its key to pk and its
// probability to pv. First: no previous pick (every entry is "after"), which skips that test.
template <bool First>
__attribute__((noinline)) void select_next_block(const float* __restrict p, int e, float* __restrict pk, int32_t* __restrict pi,
		float* __restrict pv) {
	float bk[L], bv[L];
	int32_t bi[L];
	for (int l = 0; l < L; ++l) {
		bk[l] = -INFINITY;
		bv[l] = 0.f;
		bi[l] = -1;
	}
	for (int j = 0; j < e; ++j)
		for (int l = 0; l < L; ++l) {
			const float v = p[j * L + l], key = gate_key(v), prev_key = pk[l];
			const int32_t prev_i = pi[l];
			const bool after = First || (key < prev_key) | ((key == prev_key) & (j > prev_i));
			const bool better = (key > bk[l]) | (bi[l] < 0);
			const bool take = after & better;
			bk[l] = take ? key : bk[l];
			bv[l] = take ? v : bv[l];
			bi[l] = take ? j : bi[l];
		}
	// While k <= E an entry always remains; the clamp keeps the index in [0, E) regardless.
	for (int l = 0; l < L; ++l) {
		pk[l] = bk[l];
		pv[l] = bv[l];
		pi[l] = bi[l] < 0 ? e - 1 : bi[l];
	}
}

void forward(const LaneForward& a, int64_t begin, int64_t end) {
	const int e = a.e, k = a.k;
	alignas(64) float x[1024 * L];
	alignas(64) float psum[1024 * L];
	for (int i = 0; i < e * L; ++i) psum[i] = 0.f;
	int blocks = 0;
	for (int64_t r0 = begin; r0 < end; r0 += L) {
		const int rows = end - r0 < L ? static_cast<int>(end - r0) : L;
		load_block(a.logits, r0, a.n, e, a.t, x);
		// Probabilities of the lanes past the block's last row do not count.
		alignas(64) float m[L], s[L], valid[L];
		for (int l = 0; l < L; ++l) valid[l] = l < rows ? 1.f : 0.f;
		softmax_block(x, e, m, s, psum, valid);
		for (int l = 0; l < rows; ++l)
			a.lse[r0 + l] = gate_lse(m[l], s[l], gate_is_inf(m[l]) && gate_row_has_nan(a.logits + (r0 + l) * e, e));
		if (++blocks == kFlushBlocks || r0 + L >= end) {
			for (int j = 0; j < e; ++j) {
				double acc = 0.0;
				for (int l = 0; l < L; ++l) acc += psum[j * L + l];
				a.prob_sum[j] += acc;
			}
			for (int i = 0; i < e * L; ++i) psum[i] = 0.f;
			blocks = 0;
		}
		alignas(64) float pk[L], pv[L], top_sum[L];
		alignas(64) int32_t pi[L];
		for (int l = 0; l < L; ++l) {
			pk[l] = INFINITY;
			pi[l] = -1;
			top_sum[l] = 0.f;
		}
		float* w = a.weights + r0 * k;
		int64_t* idx = a.indices + r0 * k;
		// k selection passes of E steps each (vectorised over the block's rows): cheap for the small k
		// of MoE routing; a fused two-pick pass measured slower (gcc emits masked stores for it).
		for (int j = 0; j < k; ++j) {
			if (j == 0)
				select_next_block<true>(x, e, pk, pi, pv);
			else
				select_next_block<false>(x, e, pk, pi, pv);
			for (int l = 0; l < L; ++l) top_sum[l] += pv[l];
			for (int l = 0; l < rows; ++l) {
				w[l * k + j] = pv[l];
				idx[l * k + j] = pi[l];
				++a.counts[pi[l]];
			}
		}
		if (a.renormalize) {
			for (int l = 0; l < L; ++l) top_sum[l] = 1.f / top_sum[l];
			for (int l = 0; l < rows; ++l)
				for (int j = 0; j < k; ++j) w[l * k + j] *= top_sum[l];
		}
	}
}

// gate_row_backward for rows [begin, end), L at a time.
void backward(const LaneBackward& a, int64_t begin, int64_t end) {
	const int e = a.e, k = a.k;
	const float inv_t = 1.f / a.t;
	const int64_t gw0 = a.gw_stride[0], gw1 = a.gw_stride[1];
	alignas(64) float p[1024 * L], out[1024 * L], g[1024];
	for (int j = 0; j < e; ++j) g[j] = a.grad_prob_mean[j] * a.inv_rows;
	for (int64_t r0 = begin; r0 < end; r0 += L) {
		const int rows = end - r0 < L ? static_cast<int>(end - r0) : L;
		load_block(a.logits, r0, a.n, e, a.t, p);
		alignas(64) float m[L], s[L];
		softmax_block(p, e, m, s, nullptr, nullptr);
		alignas(64) float gpm_dot_p[L], top_sum[L], gw_dot_top[L], glse[L];
		for (int l = 0; l < L; ++l) {
			gpm_dot_p[l] = 0.f;
			top_sum[l] = 0.f;
			gw_dot_top[l] = 0.f;
			glse[l] = a.grad_lse && l < rows ? a.grad_lse[(r0 + l) * a.glse_stride] : 0.f;
		}
		for (int j = 0; j < e; ++j)
			for (int l = 0; l < L; ++l) gpm_dot_p[l] += p[j * L + l] * a.grad_prob_mean[j];
		// The selected probabilities, by a scalar load per row and pick (indices out of [0, E) read 0).
		for (int l = 0; l < rows; ++l)
			for (int j = 0; j < k; ++j) {
				const int i = gate_index(a.indices[(r0 + l) * k + j], e);
				const float top = i >= 0 ? p[i * L + l] : 0.f;
				top_sum[l] += top;
				gw_dot_top[l] += (a.grad_weights ? a.grad_weights[(r0 + l) * gw0 + j * gw1] : 0.f) * top;
			}
		alignas(64) float shift[L];
		for (int l = 0; l < L; ++l)
			shift[l] = gate_backward_shift(glse[l], gpm_dot_p[l], a.inv_rows, a.renormalize, gw_dot_top[l]);
		for (int j = 0; j < e; ++j)
			for (int l = 0; l < L; ++l) out[j * L + l] = p[j * L + l] * (g[j] + shift[l]) * inv_t;
		if (a.grad_weights)
			for (int l = 0; l < rows; ++l) {
				const float inv_s = 1.f / top_sum[l], w_dot = gw_dot_top[l] * inv_s;
				for (int j = 0; j < k; ++j) {
					const int i = gate_index(a.indices[(r0 + l) * k + j], e);
					if (i < 0) continue;
					const float gwj = a.grad_weights[(r0 + l) * gw0 + j * gw1];
					out[i * L + l] += p[i * L + l] * gate_pick_grad(gwj, w_dot, inv_s, a.renormalize) * inv_t;
				}
			}
		float* dst = a.grad + r0 * e;
		for (int l = 0; l < rows; ++l)
			for (int j = 0; j < e; ++j) dst[l * e + j] = out[j * L + l];
	}
}

}  // namespace

LaneKernels kernels(const char* isa) {
	return LaneKernels{&forward, &backward, isa};
}

}  // namespace TDMPC2_LANES_NS
}  // namespace tdmpc2_moe
