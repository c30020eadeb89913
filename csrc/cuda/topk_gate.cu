// CUDA kernels of top-k gating, on raw pointers and a stream (no ATen/c10 includes).
// E <= 32: one thread per row, the row in registers (gate_forward_row / gate_row_backward with a
// compile-time E bucket). E > 32: one block per row (grid-stride), the row in shared memory, the
// block as the team of gate_team_forward_row / gate_team_backward_row. The row code is gate_row.h's,
// which CPU tests also run (cpu/gpu_rows_host.cpp).
// Statistics are deterministic: each block writes its partial sums (fixed-order warp and block
// reductions) to a workspace; the last block to finish (found by an integer ticket) adds them up in
// block order, writes expert_prob_mean and expert_frac and advances the ring cursor. One kernel per
// forward, plus a 4-byte memset of the ticket when the grid has more than one block; no float atomics.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../gate_row.h"
#include "kernel_syntax.h"
#include "launch.h"

namespace tdmpc2_moe {
namespace {

constexpr int kRowsPerBlock = 128;  // thread-per-row kernels
constexpr int kRowWarps = kRowsPerBlock / 32;
constexpr int kBlock = 256;  // block-per-row kernels
constexpr int kOwned = 1024 / kBlock;  // entries of a row each thread of a block owns (E <= 1024)
// Forward grids stop growing here (the kernels are grid-stride), which bounds the workspace.
constexpr int kMaxRowBlocks = 2048;
constexpr int kMaxTeamBlocks = 1024;
constexpr int kMaxBlocks = 4096;  // backward, block-per-row

// Zeros standing in for absent gradients (device globals are zero-initialised).
__device__ float kZeros[1024];

template <typename T>
struct CudaCvt;
template <>
struct CudaCvt<float> {
	__host__ __device__ static float from_float(float v) { return v; }
	__host__ __device__ static float to_float(float v) { return v; }
};
template <>
struct CudaCvt<__half> {
	__host__ __device__ static __half from_float(float v) { return __float2half(v); }
	__host__ __device__ static float to_float(__half v) { return __half2float(v); }
};
template <>
struct CudaCvt<__nv_bfloat16> {
	__host__ __device__ static __nv_bfloat16 from_float(float v) { return __float2bfloat16(v); }
	__host__ __device__ static float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
};

// Butterfly reductions over a warp: the same order on every run, every lane gets the result.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
	for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
	return v;
}

__device__ __forceinline__ float warp_max(float v) {
	for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
	return v;
}

// Block-wide sum or max (NaN ignored by max, as in gate_softmax); every thread gets the result.
template <bool kMax>
__device__ float block_reduce(float v, float* scratch) {
	v = kMax ? warp_max(v) : warp_sum(v);
	const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
	__syncthreads();  // the previous reduction's readers are done with scratch
	if (lane == 0) scratch[warp] = v;
	__syncthreads();
	v = lane < (kBlock >> 5) ? scratch[lane] : (kMax ? -INFINITY : 0.f);
	return kMax ? warp_max(v) : warp_sum(v);
}

// A CUDA block of kBlock threads as the team of gate_row.h's team functions.
struct BlockTeam {
	float* scratch;  // shared [32]
	__device__ int rank() const { return threadIdx.x; }
	__device__ int size() const { return kBlock; }
	__device__ float sum(float v) const { return block_reduce<false>(v, scratch); }
	__device__ float max(float v) const { return block_reduce<true>(v, scratch); }
	__device__ bool any(bool v) const { return __syncthreads_or(v) != 0; }
	__device__ void sync() const { __syncthreads(); }
};

// Called by every thread of every block once its partial statistics are in the workspace. The last
// block to arrive sums the partials of all `blocks` blocks in a fixed order (warp per expert, lane l
// over blocks l, l + 32, ..., then a butterfly), whichever block that is, writes the statistics and
// advances the cursor; the others return.
__device__ void finish_statistics(const GateForwardParams& p, int blocks) {
	__shared__ bool last;
	// Every thread's partials (and ring rows) visible device-wide before the block takes its ticket; the
	// barrier also means this block's reads of the cursor are done.
	__threadfence();
	__syncthreads();
	if (blocks > 1) {
		if (threadIdx.x == 0) last = atomicAdd(p.ticket, 1u) == static_cast<unsigned>(blocks - 1);
		__syncthreads();
		if (!last) return;
		__threadfence();
	}
	const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
	const double rows = static_cast<double>(p.n > 0 ? p.n : 1);
	for (int j = warp; j < p.e; j += warps) {
		double prob = 0.0;
		unsigned long long count = 0;
		for (int b = lane; b < blocks; b += 32) {
			prob += __ldcg(p.part_prob + static_cast<int64_t>(b) * p.e + j);
			count += __ldcg(p.part_count + static_cast<int64_t>(b) * p.e + j);
		}
		prob = warp_sum(prob);
		count = warp_sum(count);
		if (lane == 0) {
			p.prob_mean[j] = static_cast<float>(prob / rows);
			p.frac[j] = static_cast<float>(static_cast<double>(count) / (rows * p.k));
		}
	}
	if (threadIdx.x == 0 && p.cursor) *p.cursor += p.n;
}

template <int EB, typename TIn, typename TRing>
__global__ void __launch_bounds__(kRowsPerBlock, EB <= 16 ? 4 : 1) gate_forward_rows(GateForwardParams p) {
	__shared__ float warp_prob[kRowWarps][EB];
	__shared__ float warp_count[kRowWarps][EB];
	const int e = p.e, k = p.k;
	const int64_t cursor = p.ring ? *p.cursor : 0;
	float prob[EB], count[EB];
#pragma unroll
	for (int j = 0; j < EB; ++j) {
		prob[j] = 0.f;
		count[j] = 0.f;
	}
	const int64_t stride = static_cast<int64_t>(gridDim.x) * kRowsPerBlock;
	for (int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x; r < p.n; r += stride) {
		const TIn* src = static_cast<const TIn*>(p.logits) + r * e;
		float x[EB];
#pragma unroll
		for (int j = 0; j < EB; ++j) x[j] = j < e ? CudaCvt<TIn>::to_float(src[j]) / p.temperature : -INFINITY;
		float* w = p.weights + r * k;
		int64_t* idx = p.indices + r * k;
		p.lse[r] = gate_forward_row<EB>(x, e, k, p.renormalize, w, idx, count);
#pragma unroll
		for (int j = 0; j < EB; ++j) prob[j] += j < e ? x[j] : 0.f;
		int64_t pos = 0;
		if (p.ring && gate_ring_slot(cursor, r, p.n, p.capacity, &pos))
			gate_ring_write<CudaCvt<TRing>>(static_cast<TRing*>(p.ring) + pos * e, e, w, idx, k);
	}
	const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
	for (int j = 0; j < EB; ++j) {
		const float wp = warp_sum(prob[j]), wc = warp_sum(count[j]);
		if (lane == 0) {
			warp_prob[warp][j] = wp;
			warp_count[warp][j] = wc;
		}
	}
	__syncthreads();
	if (threadIdx.x < e) {
		float bp = 0.f, bc = 0.f;
		for (int w = 0; w < kRowWarps; ++w) {
			bp += warp_prob[w][threadIdx.x];
			bc += warp_count[w][threadIdx.x];
		}
		p.part_prob[static_cast<int64_t>(blockIdx.x) * e + threadIdx.x] = bp;
		p.part_count[static_cast<int64_t>(blockIdx.x) * e + threadIdx.x] = static_cast<unsigned>(bc);
	}
	finish_statistics(p, gridDim.x);
}

template <typename TIn, typename TRing>
__global__ void __launch_bounds__(kBlock) gate_forward_block(GateForwardParams p) {
	TDMPC2_DYNAMIC_SHARED(float, smem);
	__shared__ float scratch[32];
	const int e = p.e, k = p.k;
	float* prob = smem;  // [e] the current row
	float* key = smem + e;  // [e]
	const BlockTeam team{scratch};
	const int64_t cursor = p.ring ? *p.cursor : 0;
	float acc[kOwned];
	unsigned count[kOwned];
#pragma unroll
	for (int o = 0; o < kOwned; ++o) {
		acc[o] = 0.f;
		count[o] = 0u;
	}
	for (int64_t r = blockIdx.x; r < p.n; r += gridDim.x) {
		const TIn* src = static_cast<const TIn*>(p.logits) + r * e;
		for (int j = threadIdx.x; j < e; j += kBlock) prob[j] = CudaCvt<TIn>::to_float(src[j]) / p.temperature;
		int64_t pos = 0;
		TRing* ring_row = p.ring && gate_ring_slot(cursor, r, p.n, p.capacity, &pos)
				? static_cast<TRing*>(p.ring) + pos * e
				: nullptr;
		const float lse = gate_team_forward_row<kOwned, CudaCvt<TRing>>(team, prob, key, e, k, p.renormalize,
				p.weights + r * k, p.indices + r * k, acc, count, ring_row);
		if (threadIdx.x == 0) p.lse[r] = lse;
	}
#pragma unroll
	for (int o = 0; o < kOwned; ++o) {
		const int j = threadIdx.x + o * kBlock;
		if (j < e) {
			p.part_prob[static_cast<int64_t>(blockIdx.x) * e + j] = acc[o];
			p.part_count[static_cast<int64_t>(blockIdx.x) * e + j] = count[o];
		}
	}
	finish_statistics(p, gridDim.x);
}

template <int EB, typename TIn>
__global__ void __launch_bounds__(kRowsPerBlock) gate_backward_rows(GateBackwardParams p) {
	const int e = p.e, k = p.k;
	const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x;
	if (r >= p.n) return;
	const TIn* src = static_cast<const TIn*>(p.logits) + r * e;
	float x[EB], out[EB];
#pragma unroll
	for (int j = 0; j < EB; ++j) x[j] = j < e ? CudaCvt<TIn>::to_float(src[j]) / p.temperature : -INFINITY;
	const float* gw = p.grad_weights ? p.grad_weights + r * k : kZeros;
	const float* gpm = p.grad_prob_mean ? p.grad_prob_mean : kZeros;
	const float glse = p.grad_lse ? p.grad_lse[r] : 0.f;
	const float inv_rows = 1.f / static_cast<float>(p.n);
	gate_row_backward<EB>(x, out, e, k, gw, p.indices + r * k, gpm, inv_rows, glse, p.renormalize, 1.f / p.temperature);
	TIn* dst = static_cast<TIn*>(p.grad_logits) + r * e;
#pragma unroll
	for (int j = 0; j < EB; ++j)
		if (j < e) dst[j] = CudaCvt<TIn>::from_float(out[j]);
}

template <typename TIn>
__global__ void __launch_bounds__(kBlock) gate_backward_block(GateBackwardParams p) {
	TDMPC2_DYNAMIC_SHARED(float, smem);
	__shared__ float scratch[32];
	const int e = p.e, k = p.k;
	float* prob = smem;  // [e]
	float* grad = smem + e;  // [e]
	const BlockTeam team{scratch};
	const float inv_t = 1.f / p.temperature, inv_rows = 1.f / static_cast<float>(p.n);
	const float* gpm = p.grad_prob_mean ? p.grad_prob_mean : kZeros;
	for (int64_t r = blockIdx.x; r < p.n; r += gridDim.x) {
		const TIn* src = static_cast<const TIn*>(p.logits) + r * e;
		for (int j = threadIdx.x; j < e; j += kBlock) prob[j] = CudaCvt<TIn>::to_float(src[j]) * inv_t;
		const float* gw = p.grad_weights ? p.grad_weights + r * k : kZeros;
		const float glse = p.grad_lse ? p.grad_lse[r] : 0.f;
		gate_team_backward_row(team, prob, grad, e, k, gw, p.indices + r * k, gpm, inv_rows, glse, p.renormalize, inv_t);
		TIn* dst = static_cast<TIn*>(p.grad_logits) + r * e;
		for (int j = threadIdx.x; j < e; j += kBlock) dst[j] = CudaCvt<TIn>::from_float(grad[j]);
	}
}

// Calls f with a value of the C++ type behind dtype.
template <typename F>
void with_type(GateDtype dtype, F&& f) {
	switch (dtype) {
		case GateDtype::kFloat16: f(__half()); break;
		case GateDtype::kBFloat16: f(__nv_bfloat16()); break;
		default: f(float()); break;
	}
}

int64_t blocks_for(int64_t n, int64_t per_block) {
	return (n + per_block - 1) / per_block;
}

}  // namespace

int topk_gate_forward_blocks(int64_t n, int e) {
	const int64_t want = e <= 32 ? blocks_for(n, kRowsPerBlock) : n;
	const int64_t cap = e <= 32 ? kMaxRowBlocks : kMaxTeamBlocks;
	return static_cast<int>(want < 1 ? 1 : (want > cap ? cap : want));
}

cudaError_t launch_topk_gate_forward(const GateForwardParams& p, cudaStream_t stream) {
	const int blocks = topk_gate_forward_blocks(p.n, p.e);
	if (blocks > 1) {
		const cudaError_t err = cudaMemsetAsync(p.ticket, 0, sizeof(unsigned), stream);
		if (err != cudaSuccess) return err;
	}
	with_type(p.logits_dtype, [&](auto in_tag) {
		using TIn = decltype(in_tag);
		with_type(p.ring ? p.ring_dtype : GateDtype::kFloat32, [&](auto ring_tag) {
			using TRing = decltype(ring_tag);
			gate_with_bucket(p.e, [&](auto bucket) {
				constexpr int EB = decltype(bucket)::value;
				if constexpr (EB > 0)
					TDMPC2_LAUNCH(blocks, kRowsPerBlock, 0, stream, gate_forward_rows<EB, TIn, TRing>)(p);
				else
					TDMPC2_LAUNCH(blocks, kBlock, 2 * sizeof(float) * p.e, stream, gate_forward_block<TIn, TRing>)(p);
			});
		});
	});
	return cudaGetLastError();
}

cudaError_t launch_topk_gate_backward(const GateBackwardParams& p, cudaStream_t stream) {
	if (p.n == 0) return cudaSuccess;
	with_type(p.dtype, [&](auto tag) {
		using TIn = decltype(tag);
		gate_with_bucket(p.e, [&](auto bucket) {
			constexpr int EB = decltype(bucket)::value;
			if constexpr (EB > 0)
				TDMPC2_LAUNCH(static_cast<unsigned>(blocks_for(p.n, kRowsPerBlock)), kRowsPerBlock, 0, stream,
						gate_backward_rows<EB, TIn>)(p);
			else
				TDMPC2_LAUNCH(static_cast<int>(p.n < kMaxBlocks ? p.n : kMaxBlocks), kBlock, 2 * sizeof(float) * p.e,
						stream, gate_backward_block<TIn>)(p);
		});
	});
	return cudaGetLastError();
}

}  // namespace tdmpc2_moe
