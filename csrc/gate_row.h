// Per-row code of top-k softmax gating that both backends really run (__host__ __device__).
//   CUDA (cuda/topk_gate.cu): the thread-per-row kernels (E <= 32) run gate_forward_row and
//     gate_row_backward; the block-per-row kernels (E > 32) run gate_team_forward_row and
//     gate_team_backward_row with a CUDA block as the team. Both use every other function here.
//   CPU: the row-block kernels (cpu/lanes_impl.h) vectorise across 16 rows and use the scalar steps
//     (gate_exp, gate_key, gate_lse, gate_index, gate_backward_shift, gate_pick_grad) and the ring
//     slot / write; the test-only op of tests/ops/csrc/gpu_rows_host.cpp runs the CUDA kernels' row functions
//     above on the host, row by row (a one-thread team for E > 32), so CPU tests reach every function
//     in this file with the GPU's control flow. The CUDA team's shuffle/shared-memory reductions and the
//     statistics' reduction across blocks run on the CPU only in the test-only SIMT emulator build of
//     the .cu files (tests/ops/emulator, docs/gpu.md); device expf (the host uses the polynomial of
//     gate_exp) runs only on a GPU.
//
// Template parameter EB (thread-per-row functions): a compile-time bound on E (4, 8, 16 or 32) lets the
// compiler unroll the loops and keep a row in registers; entries e..EB-1 are padding.
#pragma once

#include <math.h>
#include <stdint.h>

#include <type_traits>

#if defined(__CUDACC__)
#define GATE_HD __host__ __device__ __forceinline__
#define GATE_UNROLL _Pragma("unroll")
#define GATE_UNROLL_LANES _Pragma("unroll")
#else
#define GATE_HD inline __attribute__((always_inline))
// On the host a fully unrolled 8-iteration loop is no longer a loop, and gcc stops vectorising it:
// keep the loops rolled there and let the vectoriser widen them.
#define GATE_UNROLL _Pragma("GCC unroll 1")
// The 8 lanes of a partial-result loop are unrolled: 8 independent chains in flight.
#define GATE_UNROLL_LANES _Pragma("GCC unroll 8")
#endif

namespace tdmpc2_moe {

// NaN compares as -inf, so a NaN row still yields a strict order and valid indices.
GATE_HD float gate_key(float v) {
	return v != v ? -INFINITY : v;
}

// Adds v to a[i]. With a compile-time bound the index is matched by an unrolled compare, so a row
// held in registers is never spilled to local memory by a dynamic index.
// An index outside [0, EB) (e.g. -1 from gate_index) matches nothing.
template <int EB>
GATE_HD void gate_add_at(float* a, int i, float v) {
	static_assert(EB > 0, "a compile-time bound");
GATE_UNROLL
	for (int j = 0; j < EB; ++j)
		if (j == i) a[j] += v;
}

// exp(x) for the softmax argument x - max <= 0. The device uses expf. The host uses a branch-free
// Cephes-style polynomial (about 1 ulp) that the compiler vectorises across a row, where a libm call
// would not be; exp(-inf) = 0 and NaN stays NaN as with expf, arguments below -87.3 (results below
// FLT_MIN) give 0.
GATE_HD float gate_exp(float x) {
#if defined(__CUDA_ARCH__)
	return expf(x);
#else
	const float xc = x < -87.3f ? -87.3f : (x > 88.f ? 88.f : x);
	// Round x / ln2 to the nearest integer with the 1.5 * 2^23 trick (no libm, vectorisable).
	const float n = (xc * 1.44269504088896341f + 12582912.f) - 12582912.f;
	const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
	float y = 1.9875691500e-4f;
	y = y * r + 1.3981999507e-3f;
	y = y * r + 8.3334519073e-3f;
	y = y * r + 4.1665795894e-2f;
	y = y * r + 1.6666665459e-1f;
	y = y * r + 5.0000001201e-1f;
	y = y * r * r + r + 1.f;
	const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
	float scale;
	__builtin_memcpy(&scale, &bits, sizeof(scale));
	const float v = y * scale;
	return x != x ? x : (x < -87.3f ? 0.f : v);
#endif
}

// a[i], read without a dynamic index (see gate_add_at); 0 for an index outside [0, EB).
template <int EB>
GATE_HD float gate_value_at(const float* a, int i) {
	float v = 0.f;
GATE_UNROLL
	for (int j = 0; j < EB; ++j)
		if (j == i) v = a[j];
	return v;
}

// Reduces a[0..n) with `op` over 8 independent partial results (each starting at `init`), so a long
// row is not one serial chain of dependent adds / compares.
constexpr int kLanes = 8;

template <class Op>
GATE_HD float gate_row_reduce(const float* a, int n, float init, Op op) {
	float part[kLanes];
GATE_UNROLL_LANES
	for (int l = 0; l < kLanes; ++l) part[l] = init;
	int j = 0;
	for (; j + kLanes <= n; j += kLanes)
GATE_UNROLL_LANES
		for (int l = 0; l < kLanes; ++l) part[l] = op(part[l], a[j + l]);
	for (; j < n; ++j) part[0] = op(part[0], a[j]);
	float r = part[0];
GATE_UNROLL_LANES
	for (int l = 1; l < kLanes; ++l) r = op(r, part[l]);
	return r;
}

// Max in which NaN never wins (as with fmaxf), and plain sum.
struct GateMax {
	GATE_HD float operator()(float acc, float v) const { return v > acc ? v : acc; }
};
struct GateSum {
	GATE_HD float operator()(float acc, float v) const { return acc + v; }
};

GATE_HD float gate_row_max(const float* a, int n) {
	return gate_row_reduce(a, n, -INFINITY, GateMax());
}

GATE_HD float gate_row_sum(const float* a, int n) {
	return gate_row_reduce(a, n, 0.f, GateSum());
}

GATE_HD bool gate_is_inf(float v) {
	return v == INFINITY || v == -INFINITY;
}

GATE_HD bool gate_row_has_nan(const float* a, int n) {
	bool nan = false;
	for (int j = 0; j < n; ++j) nan |= a[j] != a[j];
	return nan;
}

// The row's logsumexp as torch.logsumexp gives it, from its max m (NaN ignored), s = sum exp(x - m)
// and whether the row holds a NaN. An infinite max is the result (all -inf: -inf; a +inf entry:
// +inf) unless a NaN is present, where m + log(s) would be NaN (exp(inf - inf)).
GATE_HD float gate_lse(float m, float s, bool has_nan) {
	if (gate_is_inf(m)) return has_nan ? NAN : m;
	return m + logf(s);
}

// Turns x (logits already divided by the temperature) into softmax probabilities in place, with
// max subtraction. Returns the row's logsumexp. With a compile-time bound EB the loops run over all
// EB entries: the caller pads entries e..EB-1 with -inf, which get probability 0 (or NaN when the
// whole row is NaN) and, having the highest indices, are never selected.
template <int EB>
GATE_HD float gate_softmax(float* x) {
	const int n = EB;
	const float m = gate_row_max(x, n);
	// Only an infinite max needs to know about NaN (see gate_lse); padding entries are -inf, not NaN.
	const bool has_nan = gate_is_inf(m) && gate_row_has_nan(x, n);
	// Separate map and sum loops: the map vectorises, a fused loop would be serialised by the sum.
GATE_UNROLL
	for (int j = 0; j < n; ++j) x[j] = gate_exp(x[j] - m);
	const float s = gate_row_sum(x, n);
	const float inv = 1.f / s;
GATE_UNROLL
	for (int j = 0; j < n; ++j) x[j] *= inv;
	return gate_lse(m, s, has_nan);
}

// The next expert after (prev_k, prev_i) in routing order (prev_k: the previous pick's gate_key),
// in two branch-free, vectorisable passes: the largest key among the entries after the previous
// pick, then the lowest index holding it (ties to the lower index). While an entry remains
// (pass < e) the result is in [0, e) whatever the values, NaN included; the final clamp keeps it
// there even if none remained. Returns the index; stores its probability in *v and its key in *key.
template <int EB>
GATE_HD int gate_select_next(const float* p, int e, float prev_k, int prev_i, float* v, float* key) {
	const int n = EB;
	float part[kLanes];
GATE_UNROLL_LANES
	for (int l = 0; l < kLanes; ++l) part[l] = -INFINITY;
	int j = 0;
	for (; j + kLanes <= n; j += kLanes)
GATE_UNROLL_LANES
		for (int l = 0; l < kLanes; ++l) {
			const int i = j + l;
			const float ki = gate_key(p[i]);
			const bool after = (i < e) & ((ki < prev_k) | ((ki == prev_k) & (i > prev_i)));
			part[l] = (after & (ki > part[l])) ? ki : part[l];
		}
	for (; j < n; ++j) {
		const float kj = gate_key(p[j]);
		const bool after = (j < e) & ((kj < prev_k) | ((kj == prev_k) & (j > prev_i)));
		part[0] = (after & (kj > part[0])) ? kj : part[0];
	}
	float best = part[0];
GATE_UNROLL_LANES
	for (int l = 1; l < kLanes; ++l) best = part[l] > best ? part[l] : best;
	int best_i = e;
GATE_UNROLL
	for (int i = 0; i < n; ++i) {
		const float ki = gate_key(p[i]);
		const bool after = (i < e) & ((ki < prev_k) | ((ki == prev_k) & (i > prev_i)));
		const int cand = (after & (ki == best)) ? i : e;
		best_i = cand < best_i ? cand : best_i;
	}
	best_i = best_i < e ? best_i : e - 1;
	*key = best;
	*v = gate_value_at<EB>(p, best_i);
	return best_i;
}

// Top-k of probabilities p by k selection passes (O(k*E), the fast choice for small k): writes the
// probabilities in routing order to w[0..k) and their experts to idx[0..k). Returns their sum.
template <int EB, typename W, typename I>
GATE_HD float gate_topk(const float* p, int e, int k, W* w, I* idx) {
	float prev_k = INFINITY, sum = 0.f;
	int prev_i = -1;
	for (int j = 0; j < k; ++j) {
		float prev_v;
		prev_i = gate_select_next<EB>(p, e, prev_k, prev_i, &prev_v, &prev_k);
		w[j] = prev_v;
		idx[j] = prev_i;
		sum += prev_v;
	}
	return sum;
}

// Rank of entry j in routing order among key[0..n): how many entries come before it (keys are
// gate_key values, so the order is strict and the ranks of 0..n-1 are a permutation of [0, n)).
GATE_HD int gate_rank(const float* key, int n, int j) {
	const float kj = key[j];
	int rank = 0;
GATE_UNROLL
	for (int i = 0; i < n; ++i) rank += (key[i] > kj) | ((key[i] == kj) & (i < j));
	return rank;
}

// Divides the k selected probabilities by their sum (renormalize=True).
template <typename W>
GATE_HD void gate_renormalize(W* w, int k, float sum) {
	const float inv = 1.f / sum;
	for (int j = 0; j < k; ++j) w[j] *= inv;
}

// Ring position of row `row` of a call with n rows, for a ring of `capacity` rows whose device
// cursor reads `cursor`. Returns false for rows a full wrap would overwrite within the same call
// (only the last `capacity` rows are written, so no two rows of one call share a slot).
GATE_HD bool gate_ring_slot(int64_t cursor, int64_t row, int64_t n, int64_t capacity, int64_t* pos) {
	if (row < n - capacity) return false;
	const int64_t r = (cursor + row) % capacity;
	*pos = r < 0 ? r + capacity : r;
	return true;
}

// Writes one dense routing vector into a ring row: zeros, then the k weights at their experts.
// Cvt converts a float into the ring's element type.
template <typename Cvt, typename T, typename W, typename I>
GATE_HD void gate_ring_write(T* ring_row, int e, const W* w, const I* idx, int k) {
	for (int j = 0; j < e; ++j) ring_row[j] = Cvt::from_float(0.f);
	for (int j = 0; j < k; ++j) ring_row[idx[j]] = Cvt::from_float(static_cast<float>(w[j]));
}

// A routing index as int, or -1 when it lies outside [0, e): compared as int64 before narrowing, so
// 2^32 + 1 is not taken for expert 1. The backward accepts any int64 indices; out-of-range ones
// contribute nothing.
GATE_HD int gate_index(int64_t i, int e) {
	return (i >= 0 && i < e) ? static_cast<int>(i) : -1;
}

// The per-row shift of the backward (see gate_row_backward): glse - <gpm, p> / N - <gw, top> unless
// renormalised (then <g_top, top> vanishes: sum_j (gw_j - <gw, w>) top_j / s = <gw, w> - <gw, w>).
GATE_HD float gate_backward_shift(float glse, float gpm_dot_p, float inv_rows, bool renormalize, float gw_dot_top) {
	return glse - gpm_dot_p * inv_rows - (renormalize ? 0.f : gw_dot_top);
}

// The gradient reaching a selected probability from its weight's gradient gw (w_dot = <gw, w>,
// inv_s = 1 / sum of the top-k probabilities).
GATE_HD float gate_pick_grad(float gw, float w_dot, float inv_s, bool renormalize) {
	return renormalize ? (gw - w_dot) * inv_s : gw;
}

// Backward of one row, the formula of reference.topk_gate_backward_reference:
//   p = softmax(x);  g_top = renormalize ? (gw - <gw, w>) / s : gw   (s: sum of the top-k p, w = top / s)
//   g_p = scatter(g_top) + gpm / rows;  g_x = p * (g_p - <g_p, p> + glse);  result = g_x / T.
// On entry p holds the row's logits divided by the temperature (it is left holding the softmax);
// out receives the gradient with respect to the logits. gpm: gradient of expert_prob_mean [E];
// inv_rows = 1 / max(N, 1).
template <int EB>
GATE_HD void gate_row_backward(float* p, float* out, int e, int k, const float* gw, const int64_t* idx,
		const float* gpm, float inv_rows, float glse, bool renormalize, float inv_t) {
	gate_softmax<EB>(p);
	const int n = EB;
	float gpm_dot_p = 0.f;
GATE_UNROLL
	for (int j = 0; j < n; ++j)
		if (j < e) gpm_dot_p += p[j] * gpm[j];
	float s = 0.f, gw_dot_top = 0.f;
	for (int j = 0; j < k; ++j) {
		const float top = gate_value_at<EB>(p, gate_index(idx[j], e));
		s += top;
		gw_dot_top += gw[j] * top;
	}
	const float shift = gate_backward_shift(glse, gpm_dot_p, inv_rows, renormalize, gw_dot_top);
GATE_UNROLL
	for (int j = 0; j < n; ++j)
		if (j < e) out[j] = p[j] * (gpm[j] * inv_rows + shift) * inv_t;
	const float inv_s = 1.f / s, w_dot = gw_dot_top * inv_s;
	for (int j = 0; j < k; ++j) {
		const int i = gate_index(idx[j], e);
		gate_add_at<EB>(out, i, gate_value_at<EB>(p, i) * gate_pick_grad(gw[j], w_dot, inv_s, renormalize) * inv_t);
	}
}

// Forward of one row by one thread (the CUDA kernels for E <= 32): on entry x[0..EB) holds the row's
// logits divided by the temperature, padded with -inf past e; on return its probabilities. Writes the
// k weights and experts in routing order to w and idx, adds 1 to count[i] for each picked expert i,
// and returns the row's logsumexp.
template <int EB>
GATE_HD float gate_forward_row(float* x, int e, int k, bool renormalize, float* w, int64_t* idx, float* count) {
	const float lse = gate_softmax<EB>(x);
	const float sum = gate_topk<EB>(x, e, k, w, idx);
	if (renormalize) gate_renormalize(w, k, sum);
	for (int j = 0; j < k; ++j) gate_add_at<EB>(count, static_cast<int>(idx[j]), 1.f);
	return lse;
}

// Calls f(std::integral_constant<int, EB>()) with the compile-time bucket of e for the thread-per-row
// path (EB = 4, 8, 16 or 32), or with EB = 0 for e > 32 (the team path). Host code: the CUDA launcher
// and the host-compiled row path choose their path by it.
template <class F>
inline void gate_with_bucket(int e, F&& f) {
	if (e <= 4)
		f(std::integral_constant<int, 4>());
	else if (e <= 8)
		f(std::integral_constant<int, 8>());
	else if (e <= 16)
		f(std::integral_constant<int, 16>());
	else if (e <= 32)
		f(std::integral_constant<int, 32>());
	else
		f(std::integral_constant<int, 0>());
}

// Rows with E > 32 are handled by a team of threads that share the row in memory: a CUDA block on the
// GPU, one host thread in the test build. A Team provides rank() and size() (thread j of the team owns
// the entries j, j + size, ...), sum / max / any over the team (each thread gets the result; NaN never
// wins max), and sync() (makes every thread's writes to the shared row visible to all).
//
// Forward of one row by the team: on entry prob[0..e) holds the row's logits divided by the temperature;
// on return its probabilities. key: shared scratch [e]. Each thread adds the probabilities of its
// entries to acc[o] and its picks to count[o] (o: the entry's position among the thread's own, at most
// OWNED). Selection ranks each entry in routing order (gate_rank): an entry of rank r < k is pick r.
// With ring_row, writes the row's dense routing vector there. Returns the row's logsumexp (every thread).
template <int OWNED, class Cvt, class Team, class TRing>
GATE_HD float gate_team_forward_row(Team& team, float* prob, float* key, int e, int k, bool renormalize, float* w,
		int64_t* idx, float* acc, unsigned* count, TRing* ring_row) {
	const int first = team.rank(), step = team.size();
	float m = -INFINITY;
	bool nan = false;
	for (int j = first; j < e; j += step) {
		m = prob[j] > m ? prob[j] : m;
		nan |= prob[j] != prob[j];
	}
	m = team.max(m);
	// m is the same on every thread, so every thread takes the same branch into team.any.
	const bool has_nan = gate_is_inf(m) && team.any(nan);
	float s = 0.f;
	for (int j = first; j < e; j += step) {
		prob[j] = gate_exp(prob[j] - m);
		s += prob[j];
	}
	s = team.sum(s);
	const float inv = 1.f / s;
	int o = 0;
	for (int j = first; j < e; j += step, ++o) {
		prob[j] *= inv;
		key[j] = gate_key(prob[j]);
		acc[o] += prob[j];
	}
	team.sync();
	int rank[OWNED];
	float top = 0.f;
	o = 0;
	for (int j = first; j < e; j += step, ++o) {
		rank[o] = gate_rank(key, e, j);
		if (rank[o] < k) top += prob[j];
	}
	top = team.sum(top);
	const float scale = renormalize ? 1.f / top : 1.f;
	o = 0;
	for (int j = first; j < e; j += step, ++o) {
		const bool chosen = rank[o] < k;
		if (chosen) {
			w[rank[o]] = prob[j] * scale;
			idx[rank[o]] = j;
			++count[o];
		}
		if (ring_row) ring_row[j] = Cvt::from_float(chosen ? prob[j] * scale : 0.f);
	}
	team.sync();
	return gate_lse(m, s, has_nan);
}

// Backward of one row by the team (the formula of gate_row_backward): on entry prob[0..e) holds the
// row's logits divided by the temperature; on return grad[0..e) (shared) holds the gradient with
// respect to the logits. gw: the row's [k] weight gradients; idx: its [k] experts. The picks'
// contributions are added by thread 0 alone, in pick order (deterministic even for repeated indices).
template <class Team>
GATE_HD void gate_team_backward_row(Team& team, float* prob, float* grad, int e, int k, const float* gw,
		const int64_t* idx, const float* gpm, float inv_rows, float glse, bool renormalize, float inv_t) {
	const int first = team.rank(), step = team.size();
	float m = -INFINITY;
	for (int j = first; j < e; j += step) m = prob[j] > m ? prob[j] : m;
	m = team.max(m);
	float s = 0.f;
	for (int j = first; j < e; j += step) {
		prob[j] = gate_exp(prob[j] - m);
		s += prob[j];
	}
	s = team.sum(s);
	float gpm_dot_p = 0.f;
	for (int j = first; j < e; j += step) {
		prob[j] /= s;
		gpm_dot_p += prob[j] * gpm[j];
	}
	team.sync();
	gpm_dot_p = team.sum(gpm_dot_p);
	float top_sum = 0.f, gw_dot_top = 0.f;
	for (int j = first; j < k; j += step) {
		const int i = gate_index(idx[j], e);
		const float top = i >= 0 ? prob[i] : 0.f;
		top_sum += top;
		gw_dot_top += gw[j] * top;
	}
	top_sum = team.sum(top_sum);
	gw_dot_top = team.sum(gw_dot_top);
	const float shift = gate_backward_shift(glse, gpm_dot_p, inv_rows, renormalize, gw_dot_top);
	for (int j = first; j < e; j += step) grad[j] = prob[j] * (gpm[j] * inv_rows + shift) * inv_t;
	team.sync();
	if (first == 0) {
		const float inv_s = 1.f / top_sum, w_dot = gw_dot_top * inv_s;
		for (int j = 0; j < k; ++j) {
			const int i = gate_index(idx[j], e);
			if (i >= 0) grad[i] += prob[i] * gate_pick_grad(gw[j], w_dot, inv_s, renormalize) * inv_t;
		}
	}
	team.sync();
}

}  // namespace tdmpc2_moe
