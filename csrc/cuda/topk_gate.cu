// CUDA kernels of top-k gating, on raw pointers and a stream (no ATen/c10 includes).
// E <= 32: one thread per row, the row in registers, per-row code from gate_row.h with a compile-time
// E bucket. E > 32: one block per row (grid-stride), the row in shared memory; its ranking and ring
// slot come from gate_row.h too. Statistics: warp/block partial sums, then one atomic per expert per
// block; a one-block kernel divides them and advances the ring cursor on the device.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../gate_row.h"
#include "launch.h"

namespace tdmpc2_moe {
namespace {

constexpr int kRowsPerBlock = 128;  // thread-per-row kernels
constexpr int kBlock = 256;  // block-per-row kernels
constexpr int kOwned = 1024 / kBlock;  // entries of a row each thread of a block owns (E <= 1024)
constexpr int kMaxBlocks = 4096;

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

__device__ __forceinline__ float warp_sum(float v) {
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

// Divides the summed statistics and advances the ring cursor by n (after every row was written).
__global__ void gate_finalize(float* prob_mean, float* frac, int e, int64_t n, int k, int64_t* cursor) {
	const float rows = static_cast<float>(n > 0 ? n : 1);
	for (int j = threadIdx.x; j < e; j += blockDim.x) {
		prob_mean[j] /= rows;
		// frac held the slot counts as unsigned integers (exact, unlike float atomics past 2^24).
		const unsigned count = reinterpret_cast<unsigned*>(frac)[j];
		frac[j] = static_cast<float>(count) / (rows * static_cast<float>(k));
	}
	if (cursor && threadIdx.x == 0) *cursor += n;
}

template <int EB, typename TIn, typename TRing>
__global__ void __launch_bounds__(kRowsPerBlock, 4) gate_forward_rows(GateForwardParams p) {
	__shared__ float block_prob[EB];
	__shared__ float block_count[EB];
	if (threadIdx.x < EB) {
		block_prob[threadIdx.x] = 0.f;
		block_count[threadIdx.x] = 0.f;
	}
	__syncthreads();
	const int e = p.e, k = p.k;
	const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x;
	const bool active = r < p.n;
	const TIn* src = static_cast<const TIn*>(p.logits) + r * e;
	float x[EB], count[EB];
#pragma unroll
	for (int j = 0; j < EB; ++j) {
		x[j] = (active && j < e) ? CudaCvt<TIn>::to_float(src[j]) / p.temperature : -INFINITY;
		count[j] = 0.f;
	}
	if (active) {
		p.lse[r] = gate_softmax<EB>(x, e);
		float* w = p.weights + r * k;
		int64_t* idx = p.indices + r * k;
		const float sum = gate_topk<EB>(x, e, k, w, idx);
		if (p.renormalize) gate_renormalize(w, k, sum);
		for (int j = 0; j < k; ++j) gate_add_at<EB>(count, e, static_cast<int>(idx[j]), 1.f);
		int64_t pos;
		if (p.ring && gate_ring_slot(*p.cursor, r, p.n, p.capacity, &pos))
			gate_ring_write<CudaCvt<TRing>>(static_cast<TRing*>(p.ring) + pos * e, e, w, idx, k);
	}
#pragma unroll
	for (int j = 0; j < EB; ++j) {
		const float prob = warp_sum(active && j < e ? x[j] : 0.f);
		const float c = warp_sum(count[j]);
		if ((threadIdx.x & 31) == 0 && j < e) {
			atomicAdd(&block_prob[j], prob);
			atomicAdd(&block_count[j], c);
		}
	}
	__syncthreads();
	if (threadIdx.x < e) {
		atomicAdd(&p.prob_mean[threadIdx.x], block_prob[threadIdx.x]);
		atomicAdd(reinterpret_cast<unsigned*>(p.frac) + threadIdx.x, static_cast<unsigned>(block_count[threadIdx.x]));
	}
}

template <typename TIn, typename TRing>
__global__ void __launch_bounds__(kBlock) gate_forward_block(GateForwardParams p) {
	extern __shared__ float smem[];
	const int e = p.e, k = p.k;
	float* prob = smem;  // [e] the current row
	float* key = smem + e;  // [e] gate_key of prob
	__shared__ float scratch[32];
	float acc[kOwned];
	unsigned count[kOwned];
#pragma unroll
	for (int o = 0; o < kOwned; ++o) {
		acc[o] = 0.f;
		count[o] = 0u;
	}
	for (int64_t r = blockIdx.x; r < p.n; r += gridDim.x) {
		const TIn* src = static_cast<const TIn*>(p.logits) + r * e;
		float m = -INFINITY;
#pragma unroll
		for (int o = 0; o < kOwned; ++o) {
			const int j = threadIdx.x + o * kBlock;
			if (j < e) {
				prob[j] = CudaCvt<TIn>::to_float(src[j]) / p.temperature;
				m = prob[j] > m ? prob[j] : m;
			}
		}
		m = block_reduce<true>(m, scratch);
		float s = 0.f;
#pragma unroll
		for (int o = 0; o < kOwned; ++o) {
			const int j = threadIdx.x + o * kBlock;
			if (j < e) {
				prob[j] = gate_exp(prob[j] - m);
				s += prob[j];
			}
		}
		s = block_reduce<false>(s, scratch);
		const float inv = 1.f / s;
		if (threadIdx.x == 0) p.lse[r] = m + logf(s);
#pragma unroll
		for (int o = 0; o < kOwned; ++o) {
			const int j = threadIdx.x + o * kBlock;
			if (j < e) {
				prob[j] *= inv;
				key[j] = gate_key(prob[j]);
				acc[o] += prob[j];
			}
		}
		__syncthreads();
		int rank[kOwned];
		float top = 0.f;
#pragma unroll
		for (int o = 0; o < kOwned; ++o) {
			const int j = threadIdx.x + o * kBlock;
			rank[o] = j < e ? gate_rank(key, e, j) : k;
			if (rank[o] < k) top += prob[j];
		}
		top = block_reduce<false>(top, scratch);
		const float scale = p.renormalize ? 1.f / top : 1.f;
		int64_t pos;
		const bool record = p.ring && gate_ring_slot(*p.cursor, r, p.n, p.capacity, &pos);
#pragma unroll
		for (int o = 0; o < kOwned; ++o) {
			const int j = threadIdx.x + o * kBlock;
			if (j >= e) continue;
			const bool chosen = rank[o] < k;
			if (chosen) {
				p.weights[r * k + rank[o]] = prob[j] * scale;
				p.indices[r * k + rank[o]] = j;
				++count[o];
			}
			if (record) static_cast<TRing*>(p.ring)[pos * e + j] = CudaCvt<TRing>::from_float(chosen ? prob[j] * scale : 0.f);
		}
		__syncthreads();  // the next row overwrites prob and key
	}
#pragma unroll
	for (int o = 0; o < kOwned; ++o) {
		const int j = threadIdx.x + o * kBlock;
		if (j < e) {
			atomicAdd(&p.prob_mean[j], acc[o]);
			atomicAdd(reinterpret_cast<unsigned*>(p.frac) + j, count[o]);
		}
	}
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
	extern __shared__ float smem[];
	const int e = p.e, k = p.k;
	float* prob = smem;  // [e]
	float* grad = smem + e;  // [e]
	__shared__ float scratch[32];
	const float inv_t = 1.f / p.temperature, inv_rows = 1.f / static_cast<float>(p.n);
	const float* gpm = p.grad_prob_mean ? p.grad_prob_mean : kZeros;
	for (int64_t r = blockIdx.x; r < p.n; r += gridDim.x) {
		const TIn* src = static_cast<const TIn*>(p.logits) + r * e;
		const int64_t* idx = p.indices + r * k;
		const float* gw = p.grad_weights ? p.grad_weights + r * k : kZeros;
		float m = -INFINITY;
		for (int j = threadIdx.x; j < e; j += kBlock) {
			prob[j] = CudaCvt<TIn>::to_float(src[j]) * inv_t;
			m = prob[j] > m ? prob[j] : m;
		}
		m = block_reduce<true>(m, scratch);
		float s = 0.f;
		for (int j = threadIdx.x; j < e; j += kBlock) {
			prob[j] = gate_exp(prob[j] - m);
			s += prob[j];
		}
		s = block_reduce<false>(s, scratch);
		float gpm_dot_p = 0.f;
		for (int j = threadIdx.x; j < e; j += kBlock) {
			prob[j] /= s;
			gpm_dot_p += prob[j] * gpm[j];
		}
		gpm_dot_p = block_reduce<false>(gpm_dot_p, scratch);  // its leading barrier publishes prob
		float top_sum = 0.f, gw_dot_top = 0.f;
		for (int j = threadIdx.x; j < k; j += kBlock) {
			const int64_t i = idx[j];
			const float top = (i >= 0 && i < e) ? prob[i] : 0.f;
			top_sum += top;
			gw_dot_top += gw[j] * top;
		}
		top_sum = block_reduce<false>(top_sum, scratch);
		gw_dot_top = block_reduce<false>(gw_dot_top, scratch);
		// Same formula as gate_row_backward (see gate_row.h).
		const float glse = p.grad_lse ? p.grad_lse[r] : 0.f;
		const float shift = glse - gpm_dot_p * inv_rows - (p.renormalize ? 0.f : gw_dot_top);
		for (int j = threadIdx.x; j < e; j += kBlock) grad[j] = prob[j] * (gpm[j] * inv_rows + shift) * inv_t;
		__syncthreads();
		const float inv_s = 1.f / top_sum, w_dot = gw_dot_top * inv_s;
		for (int j = threadIdx.x; j < k; j += kBlock) {
			const int64_t i = idx[j];
			if (i < 0 || i >= e) continue;
			const float g_top = p.renormalize ? (gw[j] - w_dot) * inv_s : gw[j];
			atomicAdd(&grad[i], prob[i] * g_top * inv_t);
		}
		__syncthreads();
		TIn* dst = static_cast<TIn*>(p.grad_logits) + r * e;
		for (int j = threadIdx.x; j < e; j += kBlock) dst[j] = CudaCvt<TIn>::from_float(grad[j]);
		__syncthreads();  // the next row overwrites prob and grad
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

int blocks_for(int64_t n, int64_t per_block) {
	return static_cast<int>((n + per_block - 1) / per_block);
}

template <int EB, typename TIn, typename TRing>
void launch_rows(const GateForwardParams& p, cudaStream_t stream) {
	gate_forward_rows<EB, TIn, TRing><<<blocks_for(p.n, kRowsPerBlock), kRowsPerBlock, 0, stream>>>(p);
}

}  // namespace

cudaError_t launch_topk_gate_forward(const GateForwardParams& p, cudaStream_t stream) {
	cudaMemsetAsync(p.prob_mean, 0, sizeof(float) * p.e, stream);
	cudaMemsetAsync(p.frac, 0, sizeof(float) * p.e, stream);
	if (p.n > 0) {
		with_type(p.logits_dtype, [&](auto in_tag) {
			using TIn = decltype(in_tag);
			with_type(p.ring ? p.ring_dtype : GateDtype::kFloat32, [&](auto ring_tag) {
				using TRing = decltype(ring_tag);
				if (p.e <= 4)
					launch_rows<4, TIn, TRing>(p, stream);
				else if (p.e <= 8)
					launch_rows<8, TIn, TRing>(p, stream);
				else if (p.e <= 16)
					launch_rows<16, TIn, TRing>(p, stream);
				else if (p.e <= 32)
					launch_rows<32, TIn, TRing>(p, stream);
				else
					gate_forward_block<TIn, TRing><<<static_cast<int>(p.n < kMaxBlocks ? p.n : kMaxBlocks), kBlock,
							2 * sizeof(float) * p.e, stream>>>(p);
			});
		});
	}
	gate_finalize<<<1, 1024, 0, stream>>>(p.prob_mean, p.frac, p.e, p.n, p.k, p.ring ? p.cursor : nullptr);
	return cudaGetLastError();
}

cudaError_t launch_topk_gate_backward(const GateBackwardParams& p, cudaStream_t stream) {
	if (p.n == 0) return cudaSuccess;
	with_type(p.dtype, [&](auto tag) {
		using TIn = decltype(tag);
		const int rows = blocks_for(p.n, kRowsPerBlock);
		if (p.e <= 4)
			gate_backward_rows<4, TIn><<<rows, kRowsPerBlock, 0, stream>>>(p);
		else if (p.e <= 8)
			gate_backward_rows<8, TIn><<<rows, kRowsPerBlock, 0, stream>>>(p);
		else if (p.e <= 16)
			gate_backward_rows<16, TIn><<<rows, kRowsPerBlock, 0, stream>>>(p);
		else if (p.e <= 32)
			gate_backward_rows<32, TIn><<<rows, kRowsPerBlock, 0, stream>>>(p);
		else
			gate_backward_block<TIn><<<static_cast<int>(p.n < kMaxBlocks ? p.n : kMaxBlocks), kBlock,
					2 * sizeof(float) * p.e, stream>>>(p);
	});
	return cudaGetLastError();
}

}  // namespace tdmpc2_moe
