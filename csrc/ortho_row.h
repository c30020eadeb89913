// Per-row code of the orthonormalisation (modified Gram-Schmidt in expert order, two projection
// passes, r / max(|r|, eps)) that both backends run (__host__ __device__), forward and backward.
// A row is E vectors of width D, `stride` elements apart (features are [E, N, D], expert-major).
//
// The functions are written for a team of threads that shares one row: every loop over the D
// elements splits them among the members in the same way (ortho_each), so a member only ever reads
// elements it wrote itself, and members meet only in Team::sum (a reduction whose result every member
// gets) and Team::sync. The CPU runs them with a one-member team (cpu/orthonormalize.cpp: kLanes
// partial sums that the compiler vectorises), CUDA with a block (cuda/ortho_kernels.cu: kLanes = 1,
// a block-wide reduction); CPU tests thus run every line here, CUDA adds only its team.
//
// Team interface: `static constexpr int kLanes`; `int rank() const`, `int size() const`;
// `T sum(T partial) const` (sum over the team's members, returned to every member); `bool leader() const`
// (one member, which writes the per-row coefficients); `void sync() const` (a barrier of the team).
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define ORTHO_HD __host__ __device__ __forceinline__
#define ORTHO_UNROLL _Pragma("unroll")
#else
#define ORTHO_HD inline __attribute__((always_inline))
// The loops over a group's lanes stay loops that the vectoriser widens. ivdep holds: lane l touches
// element d0 + l of each vector only, and the vectors of a row never overlap.
#define ORTHO_UNROLL _Pragma("GCC ivdep")
#endif

namespace tdmpc2_moe {

template <typename T>
ORTHO_HD T ortho_rsqrt(T v) {
	return T(1) / sqrt(v);
}

// Calls f(d) for every element d of [0, D) that this member owns: whole groups of kLanes first (lane l
// of the group at d0 is element d0 + l), then the tail D - D % kLanes .. D - 1.
template <typename Team, typename F>
ORTHO_HD void ortho_each(const Team& team, int D, F f) {
	constexpr int L = Team::kLanes;
	const int full = D - D % L;
	for (int d0 = team.rank() * L; d0 < full; d0 += team.size() * L)
ORTHO_UNROLL
		for (int l = 0; l < L; ++l) f(d0 + l);
	for (int d = full + team.rank(); d < D; d += team.size()) f(d);
}

// ortho_each that also sums what f(d) returns, in a fixed order (per-lane partial sums, then the lanes,
// then the team): the same inputs give the same bits on every call. The loops below use it to update a
// vector and take the dot product the next step needs in the same pass over the row.
template <typename Team, typename F>
ORTHO_HD auto ortho_each_sum(const Team& team, int D, F f) -> decltype(f(0)) {
	using T = decltype(f(0));
	constexpr int L = Team::kLanes;
	T acc[L];
ORTHO_UNROLL
	for (int l = 0; l < L; ++l) acc[l] = T(0);
	const int full = D - D % L;
	for (int d0 = team.rank() * L; d0 < full; d0 += team.size() * L)
ORTHO_UNROLL
		for (int l = 0; l < L; ++l) acc[l] += f(d0 + l);
	T s = T(0);
	for (int d = full + team.rank(); d < D; d += team.size()) s += f(d);
ORTHO_UNROLL
	for (int l = 0; l < L; ++l) s += acc[l];
	return team.sum(s);
}

// Per-row coefficients the backward keeps between its recomputation of the forward and its reverse
// sweep: c[(i * 2 + pass) * E + j] = <r, q_j> of vector i's projection step on q_j in that pass, and
// inv[i] = 1 / sqrt(max(|r_i|^2, eps^2)), clamped[i] = whether the floor was taken (|r_i|^2 < eps^2).
// Sized by ortho_coef_size(E).
ORTHO_HD int64_t ortho_coef_size(int E) {
	return 2 * int64_t(E) * E + 2 * int64_t(E);
}

// Forward of one row: q_i = r_i / max(|r_i|, eps), r_i = x_i minus its projections on q_0..q_{i-1},
// taken twice. x and q are E vectors `stride` apart; q may be the output or a workspace. With `coef`
// (ortho_coef_size(E) values, written by the leader) the coefficients are kept for the backward.
template <typename Team, typename T>
ORTHO_HD void ortho_forward_row(const Team& team, const T* x, T* q, int64_t stride, int E, int D, T eps2, T* coef) {
	for (int i = 0; i < E; ++i) {
		T* r = q + i * stride;
		const T* xi = x + i * stride;
		// Step k (of 2i) projects on q_{k % i} in pass k / i; each pass over the row applies one step and
		// takes the next one's coefficient (after the last step: |r|^2).
		const int steps = 2 * i;
		const T* next = steps ? q : r;
		T c = ortho_each_sum(team, D, [&](int d) {
			r[d] = xi[d];
			return r[d] * next[d];
		});
		for (int k = 0; k < steps; ++k) {
			const T* qj = q + (k % i) * stride;
			if (coef && team.leader()) coef[(int64_t(i) * 2 + k / i) * E + k % i] = c;
			next = k + 1 < steps ? q + ((k + 1) % i) * stride : r;
			const T ck = c;
			c = ortho_each_sum(team, D, [&](int d) {
				r[d] -= ck * qj[d];
				return r[d] * next[d];
			});
		}
		const bool clamped = c < eps2;
		const T inv = ortho_rsqrt(clamped ? eps2 : c);
		if (coef && team.leader()) {
			coef[2 * int64_t(E) * E + i] = inv;
			coef[2 * int64_t(E) * E + E + i] = clamped ? T(1) : T(0);
		}
		ortho_each(team, D, [&](int d) { r[d] *= inv; });
	}
}

// Backward of one row: grad_x from grad_q = g. Recomputes the forward into gx (which then holds q, and
// is overwritten by grad_x_i once vector i's reverse step no longer needs q_i: the vectors before i
// never use it), keeps the coefficients in coef, accumulates the gradients of the q_j in gq
// (a workspace of E vectors `gq_stride` apart), and walks the steps backwards, rebuilding each step's
// input residual from its output (r_k = r_{k+1} + c q_j) in gx's slot i instead of storing it.
//   normalisation q = r inv:      g_r = inv (g_q - <q, g_q> q), the second term only where not clamped
//   step r' = r - <r, q_j> q_j:   g_r = g_r' - <q_j, g_r'> q_j,  g_qj -= c g_r' + <q_j, g_r'> r
template <typename Team, typename T>
ORTHO_HD void ortho_backward_row(const Team& team, const T* g, const T* x, T* gx, T* gq, int64_t stride,
		int64_t gq_stride, int E, int D, T eps2, T* coef) {
	ortho_forward_row(team, x, gx, stride, E, D, eps2, coef);
	team.sync();  // the leader's last coefficients are read by every member below
	for (int i = 0; i < E; ++i) {
		const T* gi = g + i * stride;
		T* gqi = gq + i * gq_stride;
		ortho_each(team, D, [&](int d) { gqi[d] = gi[d]; });
	}
	for (int i = E - 1; i >= 0; --i) {
		T* r = gx + i * stride;  // q_i now; the residual below; grad_x_i at the end
		T* gr = gq + i * gq_stride;  // g_q_i now; the residual's gradient below
		const T inv = coef[2 * int64_t(E) * E + i];
		const bool clamped = coef[2 * int64_t(E) * E + E + i] != T(0);
		const T norm = T(1) / inv;  // max(|r_i|, eps): r = q norm rebuilds the residual
		const T qg = clamped ? T(0) : ortho_each_sum(team, D, [&](int d) { return r[d] * gr[d]; });
		const int steps = 2 * i;
		if (steps == 0) {
			ortho_each(team, D, [&](int d) { r[d] = inv * (gr[d] - qg * r[d]); });
			continue;
		}
		// Steps in reverse (k = steps - 1 .. 0, on q_{k % i}); each pass applies one and takes the next
		// one's <q_j, g_r>; the last writes grad_x_i over the rebuilt residual.
		const T* next = gx + ((steps - 1) % i) * stride;
		T a = ortho_each_sum(team, D, [&](int d) {
			gr[d] = inv * (gr[d] - qg * r[d]);
			r[d] *= norm;
			return gr[d] * next[d];
		});
		for (int k = steps - 1; k >= 0; --k) {
			const T* qj = gx + (k % i) * stride;
			T* gqj = gq + (k % i) * gq_stride;
			const T c = coef[(int64_t(i) * 2 + k / i) * E + k % i];
			const T ak = a;
			if (k > 0) {
				next = gx + ((k - 1) % i) * stride;
				a = ortho_each_sum(team, D, [&](int d) {
					const T rk = r[d] + c * qj[d];
					gqj[d] -= c * gr[d] + ak * rk;
					gr[d] -= ak * qj[d];
					r[d] = rk;
					return gr[d] * next[d];
				});
			} else {
				ortho_each(team, D, [&](int d) {
					const T rk = r[d] + c * qj[d];
					gqj[d] -= c * gr[d] + ak * rk;
					r[d] = gr[d] - ak * qj[d];
				});
			}
		}
	}
}

}  // namespace tdmpc2_moe
