// CUDA kernels of the routed experts (docs/design.md 22), on raw pointers and a stream (no ATen/c10
// includes; routed_experts_launch.h). The same steps as the CPU kernel (cpu/routed_experts.cpp), for the
// static-shape path: every grid is sized by N, k, E and the layer widths, never by the per-expert counts
// (which only the device knows), so a call takes no host synchronisation and no cuBLAS.
//
// Forward: a stable counting sort of the N k slots by expert (three kernels: per-block counts in slot
// order, one block turning them into offsets, per-block scatter: perm, pos and offsets exactly as the
// CPU's); the rows gathered in sorted order; per layer a grouped tiled GEMM whose grid covers the worst
// case (each block finds its expert from the device offsets and exits when past the last tile), then a
// row kernel (a warp per row) for bias + LayerNorm + Mish / SimNorm; the weighted combination per row,
// j in order. Backward: the routing weights' gradient per slot, the output gradient scaled into sorted
// order, then per layer (last first) the row kernel of the activation and LayerNorm backward, the bias
// and LayerNorm parameters' gradients per expert and column, the weight gradient per expert as a tiled
// GEMM over the expert's rows, and the input-gradient GEMM; grad x combined per row, j in order.
//
// Determinism: every output element is written by one thread, whose sums run in a fixed order (GEMM:
// ascending k, or ascending rows for the weight gradient; LayerNorm: a warp butterfly); no float atomics,
// so the bits do not depend on block or thread order (checked on the SIMT emulator, tests/ops/
// test_routed_experts_emulated.py).
#include <math.h>

#include "../expert_act.h"
#include "kernel_syntax.h"
#include "routed_experts_launch.h"

namespace tdmpc2_moe {
namespace {

constexpr int kThreads = 256;  // every kernel
constexpr int kWarps = kThreads / 32;  // row kernels: a warp per row
constexpr int kMaxBlocks = 4096;  // grid-stride kernels stop growing their grid here
constexpr int64_t kSortChunk = 2048;  // slots per block of the sort
// GEMM tiles: kTileM x kTileN outputs per block, kTileK of the reduction per step; a thread owns the 2 x 2
// outputs (ty + 16 i, tx + 16 j), i, j in {0, 1}, ty = threadIdx.x / 16, tx = threadIdx.x % 16.
constexpr int kTileM = 32;
constexpr int kTileN = 32;
constexpr int kTileK = 16;
constexpr int kMish = static_cast<int>(ExpertAct::kMish);
constexpr int kSimNorm = static_cast<int>(ExpertAct::kSimNorm);

__device__ __forceinline__ float expert_sqrt(float v) {
	return sqrtf(v);
}

__device__ __forceinline__ double expert_sqrt(double v) {
	return sqrt(v);
}

// Butterfly sum over a warp: the same order on every run, every lane gets the result.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
	for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
	return v;
}

// The sort's bucket of an index: its expert, or e for an index outside [0, e) (sorted after every expert).
__device__ __forceinline__ int bucket_of(int64_t index, int e) {
	return index >= 0 && index < e ? static_cast<int>(index) : e;
}

// Among the block's keys (one per thread, -1 for none), the number of threads before `t` with t's key,
// and whether no thread after t has it (t then holds its key's last slot in the tile).
__device__ __forceinline__ void tile_rank(const int* keys, int t, int key, int* rank, bool* last) {
	int before = 0;
	bool after = false;
	for (int u = 0; u < kThreads; ++u)
		if (keys[u] == key) {
			before += u < t;
			after = after || u > t;
		}
	*rank = before;
	*last = !after;
}

// --- the counting sort -----------------------------------------------------------------------------------

// rows [blocks, e + 1]: block b's count of each bucket among slots [b kSortChunk, (b + 1) kSortChunk),
// counted a tile of kThreads slots at a time (the last thread of a bucket in the tile adds its rank + 1:
// no atomics; each block owns its row).
__global__ void sort_count_kernel(const int64_t* indices, int64_t s, int e, int64_t* rows) {
	__shared__ int keys[kThreads];
	int64_t* row = rows + static_cast<int64_t>(blockIdx.x) * (e + 1);
	for (int b = threadIdx.x; b <= e; b += kThreads) row[b] = 0;
	const int64_t begin = static_cast<int64_t>(blockIdx.x) * kSortChunk;
	const int64_t end = begin + kSortChunk < s ? begin + kSortChunk : s;
	for (int64_t t0 = begin; t0 < end; t0 += kThreads) {
		const int64_t slot = t0 + threadIdx.x;
		const int key = slot < end ? bucket_of(indices[slot], e) : -1;
		__syncthreads();  // the zeroed row, and the previous tile's readers done with keys and row
		keys[threadIdx.x] = key;
		__syncthreads();
		if (key >= 0) {
			int rank;
			bool last;
			tile_rank(keys, threadIdx.x, key, &rank, &last);
			if (last) row[key] += rank + 1;
		}
	}
}

// One block: rows become each block's first sorted position per bucket (bucket e's start, plus the
// counts of the blocks before it); offsets [e + 1] and the GEMMs' tile_start [e + 1] (expert j's first
// row tile, tile_start[e] the number of tiles) from the totals.
__global__ void sort_scan_kernel(int64_t* rows, int64_t blocks, int e, int64_t* totals, int64_t* offsets,
		int64_t* tile_start) {
	for (int b = threadIdx.x; b <= e; b += kThreads) {
		int64_t run = 0;
		for (int64_t blk = 0; blk < blocks; ++blk) {
			int64_t* at = rows + blk * (e + 1) + b;
			const int64_t count = *at;
			*at = run;
			run += count;
		}
		totals[b] = run;
	}
	__syncthreads();
	if (threadIdx.x == 0) {
		int64_t offset = 0, tiles = 0;
		for (int j = 0; j < e; ++j) {
			offsets[j] = offset;
			tile_start[j] = tiles;
			offset += totals[j];
			tiles += (totals[j] + kTileM - 1) / kTileM;
		}
		offsets[e] = offset;  // where the slots of out-of-range indices begin
		tile_start[e] = tiles;
	}
	__syncthreads();
	for (int b = threadIdx.x; b <= e; b += kThreads) {
		const int64_t start = offsets[b];
		for (int64_t blk = 0; blk < blocks; ++blk) rows[blk * (e + 1) + b] += start;
	}
}

// Each slot's sorted position: its block's start for the bucket plus its rank among the bucket's slots
// before it in the block (tiles in slot order, threads in slot order within a tile): stable by slot.
__global__ void sort_scatter_kernel(const int64_t* indices, int64_t s, int e, int64_t* rows, int64_t* perm,
		int64_t* pos) {
	__shared__ int keys[kThreads];
	int64_t* row = rows + static_cast<int64_t>(blockIdx.x) * (e + 1);
	const int64_t begin = static_cast<int64_t>(blockIdx.x) * kSortChunk;
	const int64_t end = begin + kSortChunk < s ? begin + kSortChunk : s;
	for (int64_t t0 = begin; t0 < end; t0 += kThreads) {
		const int64_t slot = t0 + threadIdx.x;
		const int key = slot < end ? bucket_of(indices[slot], e) : -1;
		__syncthreads();  // the previous tile's row updates done, its readers done with keys
		keys[threadIdx.x] = key;
		__syncthreads();
		int rank = 0;
		bool last = false;
		if (key >= 0) {
			tile_rank(keys, threadIdx.x, key, &rank, &last);
			const int64_t p = row[key] + rank;
			perm[p] = slot;
			pos[slot] = p;
		}
		__syncthreads();  // every thread has read row[key] before the last one advances it
		if (key >= 0 && last) row[key] += rank + 1;
	}
}

// tile_start from offsets (the backward: offsets come from saved[0]).
__global__ void tile_start_kernel(const int64_t* offsets, int e, int64_t* tile_start) {
	if (threadIdx.x != 0) return;
	int64_t tiles = 0;
	for (int j = 0; j < e; ++j) {
		tile_start[j] = tiles;
		tiles += (offsets[j + 1] - offsets[j] + kTileM - 1) / kTileM;
	}
	tile_start[e] = tiles;
}

// --- element-wise ------------------------------------------------------------------------------------------

// h0 [s, in]: row p is x's row of slot perm[p].
template <typename T>
__global__ void gather_kernel(const T* x, int64_t x_row, int64_t x_col, const int64_t* perm, int k, int64_t s,
		int64_t in, T* h0) {
	const int64_t total = s * in, stride = static_cast<int64_t>(gridDim.x) * kThreads;
	for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < total; i += stride) {
		const int64_t p = i / in, c = i % in;
		h0[i] = x[(perm[p] / k) * x_row + c * x_col];
	}
}

// out [n, d]: out[r] = sum_j scale[r k + j] * y[pos[r k + j]], j in order (scale null: 1); a slot whose
// index is outside [0, e) adds NaN (its y row was never computed).
template <typename T>
__global__ void combine_kernel(const T* y, const int64_t* pos, const int64_t* indices, const T* scale, int64_t n,
		int k, int e, int64_t d, T* out) {
	const int64_t total = n * d, stride = static_cast<int64_t>(gridDim.x) * kThreads;
	for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < total; i += stride) {
		const int64_t r = i / d, c = i % d;
		T o = T(0);
		for (int j = 0; j < k; ++j) {
			const int64_t slot = r * k + j;
			const T v = bucket_of(indices[slot], e) < e ? y[pos[slot] * d + c] : T(NAN);
			const T w = scale ? scale[slot] : T(1);
			o = j == 0 ? w * v : o + w * v;
		}
		out[i] = o;
	}
}

// grad_weights [s]: <grad_out[slot / k], y[pos[slot]]>, columns in order (NaN for an out-of-range index).
template <typename T>
__global__ void weights_grad_kernel(const T* grad_out, const T* y, const int64_t* pos, const int64_t* indices,
		int64_t s, int k, int e, int64_t d, T* grad_weights) {
	const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
	for (int64_t slot = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; slot < s; slot += stride) {
		if (bucket_of(indices[slot], e) == e) {
			grad_weights[slot] = T(NAN);
			continue;
		}
		const T* a = grad_out + (slot / k) * d;
		const T* b = y + pos[slot] * d;
		T dot = T(0);
		for (int64_t c = 0; c < d; ++c) dot += a[c] * b[c];
		grad_weights[slot] = dot;
	}
}

// g [s, d] in sorted order: the gradient of the experts' outputs, weight * grad_out of the slot's row
// (rows of out-of-range slots, from offsets[e] on, are left alone: nothing reads them).
template <typename T>
__global__ void scale_grad_kernel(const T* grad_out, const T* scale, const int64_t* perm, const int64_t* offsets,
		int k, int e, int64_t d, T* g) {
	const int64_t total = offsets[e] * d, stride = static_cast<int64_t>(gridDim.x) * kThreads;
	for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < total; i += stride) {
		const int64_t slot = perm[i / d];
		g[i] = scale[slot] * grad_out[(slot / k) * d + i % d];
	}
}

// --- GEMMs ------------------------------------------------------------------------------------------------

// The two barriers of a tile loop: after the tile's loads (every thread reads what the others loaded)
// and after its use (before the next loads overwrite it). A template parameter of the GEMM kernels so
// that the emulator's test build can instantiate one with a barrier missing (its planted bug,
// tests/ops/emulator/routed_experts_kernels.cpp); the launchers here use these.
struct TileBarriers {
	__device__ static void after_load() { __syncthreads(); }
	__device__ static void after_use() { __syncthreads(); }
};

// Grouped GEMM over the sorted rows: c[p, n] = sum_q a[p, q] b_e(q, n) for the rows p of each expert e,
// a [s, kdim], c [s, ndim]; b_e(q, n) = w[e][n][q] (w [E, ndim, kdim]: the forward, x W^T) or, with kNN,
// w[e][q][n] (w [E, kdim, ndim]: the input gradient, g W). Block b's row tile is b / col_tiles: expert
// j's tiles are tile_start[j] .. tile_start[j + 1] (kTileM rows each, the last one partial), and blocks
// past tile_start[e] (the grid covers the worst case, s / kTileM + e tiles) return at once.
template <typename T, bool kNN, class Barriers>
__global__ void grouped_gemm_kernel(const T* a, const T* w, T* c, const int64_t* offsets, const int64_t* tile_start,
		int e, int64_t kdim, int64_t ndim, int64_t col_tiles) {
	__shared__ T as[kTileK][kTileM + 1];
	__shared__ T bs[kTileK][kTileN + 1];
	const int64_t tile = blockIdx.x / col_tiles, col0 = (blockIdx.x % col_tiles) * kTileN;
	if (tile >= tile_start[e]) return;  // block-uniform: no barrier is skipped by part of a block
	int lo = 0, hi = e;  // the last expert whose first tile is at or before `tile` (a non-empty one)
	while (hi - lo > 1) {
		const int mid = (lo + hi) / 2;
		if (tile_start[mid] <= tile) lo = mid;
		else hi = mid;
	}
	const int64_t row0 = offsets[lo] + (tile - tile_start[lo]) * kTileM, row_end = offsets[lo + 1];
	const T* we = w + static_cast<int64_t>(lo) * kdim * ndim;
	const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
	T acc[2][2] = {{T(0), T(0)}, {T(0), T(0)}};
	for (int64_t q0 = 0; q0 < kdim; q0 += kTileK) {
		for (int i = threadIdx.x; i < kTileM * kTileK; i += kThreads) {
			const int m = i / kTileK, q = i % kTileK;  // consecutive threads along a row of a
			const int64_t row = row0 + m, col = q0 + q;
			as[q][m] = row < row_end && col < kdim ? a[row * kdim + col] : T(0);
		}
		for (int i = threadIdx.x; i < kTileN * kTileK; i += kThreads) {
			// Consecutive threads along w's contiguous dimension.
			const int n = kNN ? i % kTileN : i / kTileK, q = kNN ? i / kTileN : i % kTileK;
			const int64_t col = col0 + n, red = q0 + q;
			bs[q][n] = col < ndim && red < kdim ? we[kNN ? red * ndim + col : col * kdim + red] : T(0);
		}
		Barriers::after_load();
		const int q_end = kdim - q0 < kTileK ? static_cast<int>(kdim - q0) : kTileK;
		for (int q = 0; q < q_end; ++q)
			for (int i = 0; i < 2; ++i)
				for (int j = 0; j < 2; ++j) acc[i][j] += as[q][ty + 16 * i] * bs[q][tx + 16 * j];
		Barriers::after_use();
	}
	for (int i = 0; i < 2; ++i)
		for (int j = 0; j < 2; ++j) {
			const int64_t row = row0 + ty + 16 * i, col = col0 + tx + 16 * j;
			if (row < row_end && col < ndim) c[row * ndim + col] = acc[i][j];
		}
}

// The weight gradient per expert: dw[e][o][i] = sum over e's rows p (ascending) of g[p, o] h[p, i],
// g [s, out], h [s, in]. Block b: expert b / (out_tiles in_tiles), then an output tile; an expert
// without rows gets zeros.
template <typename T, class Barriers>
__global__ void weight_grad_kernel(const T* g, const T* h, T* dw, const int64_t* offsets, int64_t out, int64_t in,
		int64_t out_tiles, int64_t in_tiles) {
	__shared__ T gs[kTileK][kTileM + 1];
	__shared__ T hs[kTileK][kTileN + 1];
	const int64_t per_expert = out_tiles * in_tiles, ex = blockIdx.x / per_expert;
	const int64_t o0 = (blockIdx.x % per_expert) / in_tiles * kTileM, i0 = (blockIdx.x % in_tiles) * kTileN;
	const int64_t begin = offsets[ex], end = offsets[ex + 1];
	const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
	T acc[2][2] = {{T(0), T(0)}, {T(0), T(0)}};
	for (int64_t p0 = begin; p0 < end; p0 += kTileK) {
		for (int i = threadIdx.x; i < kTileK * kTileM; i += kThreads) {
			const int q = i / kTileM, o = i % kTileM;
			gs[q][o] = p0 + q < end && o0 + o < out ? g[(p0 + q) * out + o0 + o] : T(0);
		}
		for (int i = threadIdx.x; i < kTileK * kTileN; i += kThreads) {
			const int q = i / kTileN, c = i % kTileN;
			hs[q][c] = p0 + q < end && i0 + c < in ? h[(p0 + q) * in + i0 + c] : T(0);
		}
		Barriers::after_load();
		const int q_end = end - p0 < kTileK ? static_cast<int>(end - p0) : kTileK;
		for (int q = 0; q < q_end; ++q)
			for (int i = 0; i < 2; ++i)
				for (int j = 0; j < 2; ++j) acc[i][j] += gs[q][ty + 16 * i] * hs[q][tx + 16 * j];
		Barriers::after_use();
	}
	for (int i = 0; i < 2; ++i)
		for (int j = 0; j < 2; ++j) {
			const int64_t o = o0 + ty + 16 * i, c = i0 + tx + 16 * j;
			if (o < out && c < in) dw[(ex * out + o) * in + c] = acc[i][j];
		}
}

// The bias and LayerNorm parameters' gradients, a thread per (expert, column), over the expert's rows in
// order: grad_bias = sum g (the pre-activation's gradient), grad_beta = sum ga, grad_gamma = sum ga xhat
// (ga: the LayerNorm affine output's gradient, read for a normed layer only).
template <typename T>
__global__ void vector_grads_kernel(const T* g, const T* ga, const T* xhat, const int64_t* offsets, int e, int64_t d,
		bool normed, T* grad_bias, T* grad_gamma, T* grad_beta) {
	const int64_t total = static_cast<int64_t>(e) * d, stride = static_cast<int64_t>(gridDim.x) * kThreads;
	for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < total; i += stride) {
		const int64_t ex = i / d, c = i % d;
		T sum_g = T(0), sum_a = T(0), sum_ax = T(0);
		for (int64_t p = offsets[ex]; p < offsets[ex + 1]; ++p) {
			sum_g += g[p * d + c];
			if (normed) {
				sum_a += ga[p * d + c];
				sum_ax += ga[p * d + c] * xhat[p * d + c];
			}
		}
		grad_bias[i] = sum_g;
		if (normed) {
			grad_gamma[i] = sum_ax;
			grad_beta[i] = sum_a;
		}
	}
}

// --- rows: bias, LayerNorm, activation ----------------------------------------------------------------------

// A warp per sorted row p < offsets[e] (its expert: indices[perm[p]]). Lane l owns the groups l, l + 32,
// ... of `width` columns each (SimNorm's group; 1 otherwise), so that every phase touches only the lane's
// own columns and the row needs no barrier, only the butterfly sums.
struct RowWarp {
	int lane;
	int64_t p, stride;
};

__device__ __forceinline__ RowWarp row_warp() {
	return {static_cast<int>(threadIdx.x & 31), static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5),
			static_cast<int64_t>(gridDim.x) * kWarps};
}

// z (h, [rows, d], the GEMM's output) becomes the layer's output in place: z + bias, then for a normed
// layer LayerNorm (two passes, as the CPU) and Mish or SimNorm; xhat [rows, d] and rstd [rows] written
// when xhat is not null.
template <typename T>
__global__ void rows_forward_kernel(T* h, T* xhat, T* rstd, const T* bias, const T* gamma, const T* beta,
		const int64_t* perm, const int64_t* indices, const int64_t* offsets, int e, int act, int64_t d, int group) {
	const int64_t width = act == kSimNorm ? group : 1, groups = d / width, rows = offsets[e];
	for (RowWarp w = row_warp(); w.p < rows; w.p += w.stride) {  // warp-uniform
		const int64_t ex = indices[perm[w.p]];
		T* z = h + w.p * d;
		const T* b = bias + ex * d;
		T sum = T(0);
		for (int64_t q = w.lane; q < groups; q += 32)
			for (int64_t c = q * width; c < (q + 1) * width; ++c) {
				z[c] += b[c];
				sum += z[c];
			}
		if (act != kMish && act != kSimNorm) continue;
		const T mean = warp_sum(sum) / T(d);
		T sq = T(0);
		for (int64_t q = w.lane; q < groups; q += 32)
			for (int64_t c = q * width; c < (q + 1) * width; ++c) sq += (z[c] - mean) * (z[c] - mean);
		const T rs = T(1) / expert_sqrt(warp_sum(sq) / T(d) + T(kExpertNormEps));
		if (xhat && w.lane == 0) rstd[w.p] = rs;
		const T* gm = gamma + ex * d;
		const T* bt = beta + ex * d;
		for (int64_t q = w.lane; q < groups; q += 32) {
			const int64_t c0 = q * width, c1 = c0 + width;
			for (int64_t c = c0; c < c1; ++c) {
				const T xh = (z[c] - mean) * rs;
				if (xhat) xhat[w.p * d + c] = xh;
				const T a = xh * gm[c] + bt[c];
				z[c] = act == kMish ? expert_mish(a) : a;
			}
			if (act != kSimNorm) continue;
			T m = z[c0];
			for (int64_t c = c0 + 1; c < c1; ++c) m = z[c] > m ? z[c] : m;
			T s = T(0);
			for (int64_t c = c0; c < c1; ++c) {
				z[c] = expert_exp(z[c] - m);
				s += z[c];
			}
			const T inv = T(1) / s;
			for (int64_t c = c0; c < c1; ++c) z[c] *= inv;
		}
	}
}

// g (the gradient of a normed layer's output, [rows, d]) becomes the gradient of its pre-bias z in place;
// ga [rows, d] receives the gradient of the LayerNorm's affine output (the same formulas as the CPU's
// backward_row). h is the layer's output (SimNorm's backward reads it).
template <typename T>
__global__ void rows_backward_kernel(T* g, T* ga, const T* h, const T* xhat, const T* rstd, const T* gamma,
		const T* beta, const int64_t* perm, const int64_t* indices, const int64_t* offsets, int e, int act, int64_t d,
		int group) {
	const int64_t width = act == kSimNorm ? group : 1, groups = d / width, rows = offsets[e];
	for (RowWarp w = row_warp(); w.p < rows; w.p += w.stride) {
		const int64_t ex = indices[perm[w.p]], at = w.p * d;
		const T* gm = gamma + ex * d;
		const T* bt = beta + ex * d;
		T mean_g = T(0), mean_gx = T(0);
		for (int64_t q = w.lane; q < groups; q += 32) {
			const int64_t c0 = q * width, c1 = c0 + width;
			if (act == kMish) {
				for (int64_t c = c0; c < c1; ++c) ga[at + c] = g[at + c] * expert_mish_grad(xhat[at + c] * gm[c] + bt[c]);
			} else {
				T dot = T(0);
				for (int64_t c = c0; c < c1; ++c) dot += g[at + c] * h[at + c];
				for (int64_t c = c0; c < c1; ++c) ga[at + c] = h[at + c] * (g[at + c] - dot);
			}
			for (int64_t c = c0; c < c1; ++c) {
				const T gx = ga[at + c] * gm[c];
				mean_g += gx;
				mean_gx += gx * xhat[at + c];
			}
		}
		mean_g = warp_sum(mean_g) / T(d);
		mean_gx = warp_sum(mean_gx) / T(d);
		const T rs = rstd[w.p];
		for (int64_t q = w.lane; q < groups; q += 32)
			for (int64_t c = q * width; c < (q + 1) * width; ++c)
				g[at + c] = rs * (ga[at + c] * gm[c] - mean_g - xhat[at + c] * mean_gx);
	}
}

// --- launchers -------------------------------------------------------------------------------------------------

unsigned grid_for(int64_t items, int64_t per_block) {
	const int64_t blocks = (items + per_block - 1) / per_block;
	return static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

int64_t sort_blocks(int64_t s) {
	return (s + kSortChunk - 1) / kSortChunk;
}

// The int64 scratch: the sort's rows [blocks, e + 1], totals [e + 1], tile_start [e + 1].
struct SortWork {
	int64_t* rows;
	int64_t blocks;
	int64_t* totals;
	int64_t* tile_start;
};

SortWork sort_work(int64_t* work, int64_t s, int e) {
	const int64_t blocks = sort_blocks(s);
	return {work, blocks, work + blocks * (e + 1), work + (blocks + 1) * (e + 1)};
}

// Stops at the first failed launch (a launch error; a kernel's own fault shows later, on the stream).
#define TDMPC2_EXPERTS_CHECK()                                        \
	do {                                                                \
		const cudaError_t err_ = cudaGetLastError();                      \
		if (err_ != cudaSuccess) return err_;                             \
	} while (0)

// c [s, ndim] = the grouped GEMM of a [s, kdim] with the experts' w (grouped_gemm_kernel).
template <typename T, bool kNN>
cudaError_t grouped_gemm(const T* a, const T* w, T* c, const int64_t* offsets, const int64_t* tile_start, int64_t s,
		int e, int64_t kdim, int64_t ndim, cudaStream_t stream) {
	if (s == 0) return cudaSuccess;
	const int64_t col_tiles = (ndim + kTileN - 1) / kTileN, row_tiles = (s + kTileM - 1) / kTileM + e;
	TDMPC2_LAUNCH(static_cast<unsigned>(row_tiles * col_tiles), kThreads, 0, stream,
			grouped_gemm_kernel<T, kNN, TileBarriers>)(a, w, c, offsets, tile_start, e, kdim, ndim, col_tiles);
	return cudaGetLastError();
}

template <typename T>
cudaError_t forward(const ExpertsForwardParams& p, cudaStream_t stream) {
	const int64_t s = p.n * p.k;
	const int e = p.e;
	int64_t* perm = p.table;
	int64_t* pos = perm + s;
	int64_t* offsets = pos + s;
	const SortWork sw = sort_work(p.work, s, e);
	if (s > 0) {
		TDMPC2_LAUNCH(static_cast<unsigned>(sw.blocks), kThreads, 0, stream, sort_count_kernel)(p.indices, s, e, sw.rows);
		TDMPC2_EXPERTS_CHECK();
	}
	TDMPC2_LAUNCH(1, kThreads, 0, stream, sort_scan_kernel)(sw.rows, sw.blocks, e, sw.totals, offsets, sw.tile_start);
	TDMPC2_EXPERTS_CHECK();
	if (s > 0) {
		TDMPC2_LAUNCH(static_cast<unsigned>(sw.blocks), kThreads, 0, stream, sort_scatter_kernel)(p.indices, s, e,
				sw.rows, perm, pos);
		TDMPC2_EXPERTS_CHECK();
	}
	const ExpertLayerArgs& first = p.layers[0];
	if (s * first.in > 0) {
		TDMPC2_LAUNCH(grid_for(s * first.in, kThreads), kThreads, 0, stream, gather_kernel<T>)(static_cast<const T*>(p.x),
				p.x_row, p.x_col, perm, p.k, s, first.in, static_cast<T*>(const_cast<void*>(first.h_in)));
		TDMPC2_EXPERTS_CHECK();
	}
	for (int l = 0; l < p.n_layers; ++l) {
		const ExpertLayerArgs& layer = p.layers[l];
		T* h_out = static_cast<T*>(layer.h_out);
		const cudaError_t err = grouped_gemm<T, false>(static_cast<const T*>(layer.h_in), static_cast<const T*>(layer.weight),
				h_out, offsets, sw.tile_start, s, e, layer.in, layer.out, stream);
		if (err != cudaSuccess) return err;
		if (s == 0) continue;
		TDMPC2_LAUNCH(grid_for(s, kWarps), kThreads, 0, stream, rows_forward_kernel<T>)(h_out,
				static_cast<T*>(layer.xhat), static_cast<T*>(layer.rstd), static_cast<const T*>(layer.bias),
				static_cast<const T*>(layer.gamma), static_cast<const T*>(layer.beta), perm, p.indices, offsets, e,
				layer.act, layer.out, p.group);
		TDMPC2_EXPERTS_CHECK();
	}
	const ExpertLayerArgs& last = p.layers[p.n_layers - 1];
	if (p.n * last.out > 0) {
		TDMPC2_LAUNCH(grid_for(p.n * last.out, kThreads), kThreads, 0, stream, combine_kernel<T>)(
				static_cast<const T*>(last.h_out), pos, p.indices, static_cast<const T*>(p.weights), p.n, p.k, e, last.out,
				static_cast<T*>(p.out));
		TDMPC2_EXPERTS_CHECK();
	}
	return cudaSuccess;
}

template <typename T>
cudaError_t backward(const ExpertsBackwardParams& p, cudaStream_t stream) {
	const int64_t s = p.n * p.k;
	const int e = p.e;
	const int64_t* perm = p.table;
	const int64_t* pos = perm + s;
	const int64_t* offsets = pos + s;
	const SortWork sw = sort_work(p.work, s, e);
	TDMPC2_LAUNCH(1, 32, 0, stream, tile_start_kernel)(offsets, e, sw.tile_start);
	TDMPC2_EXPERTS_CHECK();
	const ExpertLayerArgs& last = p.layers[p.n_layers - 1];
	const T* scale = static_cast<const T*>(p.weights);
	const T* grad_out = static_cast<const T*>(p.grad_out);
	T* g = static_cast<T*>(p.grad_a);
	T* other = static_cast<T*>(p.grad_b);
	if (s > 0) {
		TDMPC2_LAUNCH(grid_for(s, kThreads), kThreads, 0, stream, weights_grad_kernel<T>)(grad_out,
				static_cast<const T*>(last.h_out), pos, p.indices, s, p.k, e, last.out, static_cast<T*>(p.grad_weights));
		TDMPC2_EXPERTS_CHECK();
		TDMPC2_LAUNCH(grid_for(s * last.out, kThreads), kThreads, 0, stream, scale_grad_kernel<T>)(grad_out, scale, perm,
				offsets, p.k, e, last.out, g);
		TDMPC2_EXPERTS_CHECK();
	}
	for (int l = p.n_layers - 1; l >= 0; --l) {
		const ExpertLayerArgs& layer = p.layers[l];
		const bool normed = layer.act == kMish || layer.act == kSimNorm;
		T* ga = normed ? static_cast<T*>(p.grad_affine) : nullptr;
		if (normed && s > 0) {
			TDMPC2_LAUNCH(grid_for(s, kWarps), kThreads, 0, stream, rows_backward_kernel<T>)(g, ga,
					static_cast<const T*>(layer.h_out), static_cast<const T*>(layer.xhat), static_cast<const T*>(layer.rstd),
					static_cast<const T*>(layer.gamma), static_cast<const T*>(layer.beta), perm, p.indices, offsets, e,
					layer.act, layer.out, p.group);
			TDMPC2_EXPERTS_CHECK();
		}
		TDMPC2_LAUNCH(grid_for(e * layer.out, kThreads), kThreads, 0, stream, vector_grads_kernel<T>)(g, ga,
				static_cast<const T*>(layer.xhat), offsets, e, layer.out, normed, static_cast<T*>(layer.grad_bias),
				static_cast<T*>(layer.grad_gamma), static_cast<T*>(layer.grad_beta));
		TDMPC2_EXPERTS_CHECK();
		if (layer.in > 0) {
			const int64_t out_tiles = (layer.out + kTileM - 1) / kTileM, in_tiles = (layer.in + kTileN - 1) / kTileN;
			TDMPC2_LAUNCH(static_cast<unsigned>(e * out_tiles * in_tiles), kThreads, 0, stream,
					weight_grad_kernel<T, TileBarriers>)(g, static_cast<const T*>(layer.h_in), static_cast<T*>(layer.grad_weight),
					offsets, layer.out, layer.in, out_tiles, in_tiles);
			TDMPC2_EXPERTS_CHECK();
		}
		if (l == 0 && !p.grad_x) break;
		T* grad_in = l == 0 ? static_cast<T*>(p.grad_h0) : other;
		if (layer.in > 0) {
			const cudaError_t err = grouped_gemm<T, true>(g, static_cast<const T*>(layer.weight), grad_in, offsets,
					sw.tile_start, s, e, layer.out, layer.in, stream);
			if (err != cudaSuccess) return err;
		}
		other = g;
		g = grad_in;
	}
	if (p.grad_x && p.n * p.layers[0].in > 0) {
		TDMPC2_LAUNCH(grid_for(p.n * p.layers[0].in, kThreads), kThreads, 0, stream, combine_kernel<T>)(
				static_cast<const T*>(p.grad_h0), pos, p.indices, static_cast<const T*>(nullptr), p.n, p.k, e, p.layers[0].in,
				static_cast<T*>(p.grad_x));
		TDMPC2_EXPERTS_CHECK();
	}
	return cudaSuccess;
}

#undef TDMPC2_EXPERTS_CHECK

}  // namespace

int64_t routed_experts_sort_work(int64_t s, int e) {
	return (sort_blocks(s) + 2) * (e + 1);
}

cudaError_t launch_routed_experts_forward(const ExpertsForwardParams& p, cudaStream_t stream) {
	return p.f64 ? forward<double>(p, stream) : forward<float>(p, stream);
}

cudaError_t launch_routed_experts_backward(const ExpertsBackwardParams& p, cudaStream_t stream) {
	return p.f64 ? backward<double>(p, stream) : backward<float>(p, stream);
}

}  // namespace tdmpc2_moe
