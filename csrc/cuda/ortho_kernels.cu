// CUDA kernels of the orthonormalisation: one block per row, the block being the team of ortho_row.h
// (each thread owns the elements d = rank, rank + blockDim.x, ...; dot products reduced across the block
// in a fixed order, so results are deterministic). Raw pointers and a stream only (ortho_launch.h).
#include "../ortho_row.h"
#include "kernel_syntax.h"
#include "ortho_launch.h"

namespace tdmpc2_moe {
namespace {

// Threads per block at most (threads_for); no __launch_bounds__: with it ptxas spilled the float64 backward.
constexpr int kMaxThreads = 256;
constexpr int kWarps = kMaxThreads / 32;

template <typename T>
struct BlockTeam {
	static constexpr int kLanes = 1;
	T* partials;  // [kWarps] in shared memory
	__device__ int rank() const { return threadIdx.x; }
	__device__ int size() const { return blockDim.x; }
	__device__ bool leader() const { return threadIdx.x == 0; }
	__device__ void sync() const { __syncthreads(); }
	__device__ T sum(T v) const {
		for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
		if ((threadIdx.x & 31) == 0) partials[threadIdx.x >> 5] = v;
		__syncthreads();
		T s = T(0);
		for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) s += partials[w];
		__syncthreads();  // before the next sum overwrites the partials
		return s;
	}
};

template <typename T>
__global__ void ortho_forward_kernel(const T* x, T* q, int64_t n, int e, int d, T eps2) {
	__shared__ T partials[kWarps];
	const BlockTeam<T> team{partials};
	for (int64_t row = blockIdx.x; row < n; row += gridDim.x)
		ortho_forward_row(team, x + row * d, q + row * d, n * d, e, d, eps2, static_cast<T*>(nullptr));
}

template <typename T>
__global__ void ortho_backward_kernel(const T* g, const T* x, T* gx, T* gq, int64_t n, int e, int d, T eps2) {
	__shared__ T partials[kWarps];
	TDMPC2_DYNAMIC_SHARED(unsigned char, coef_bytes);  // ortho_coef_size(e) values
	T* coef = reinterpret_cast<T*>(coef_bytes);
	const BlockTeam<T> team{partials};
	for (int64_t row = blockIdx.x; row < n; row += gridDim.x) {
		ortho_backward_row(team, g + row * d, x + row * d, gx + row * d, gq + row * d, n * d, n * d, e, d, eps2, coef);
		__syncthreads();  // the next row's coefficients overwrite these
	}
}

// A multiple of 32 threads, at most kMaxThreads, about one per element.
int threads_for(int d) {
	const int t = (d + 31) / 32 * 32;
	return t < 32 ? 32 : (t > kMaxThreads ? kMaxThreads : t);
}

unsigned blocks_for(int64_t n) {
	return static_cast<unsigned>(n < 2147483647 ? n : 2147483647);
}

template <typename T>
cudaError_t launch(const OrthoParams& p, cudaStream_t stream) {
	if (p.n == 0 || p.e == 0) return cudaSuccess;
	const int threads = threads_for(p.d);
	const T eps2 = static_cast<T>(p.eps2);
	if (!p.grad) {
		TDMPC2_LAUNCH(blocks_for(p.n), threads, 0, stream, ortho_forward_kernel<T>)(static_cast<const T*>(p.x),
				static_cast<T*>(p.out), p.n, p.e, p.d, eps2);
	} else {
		const size_t shared = sizeof(T) * static_cast<size_t>(ortho_coef_size(p.e));
		TDMPC2_LAUNCH(blocks_for(p.n), threads, shared, stream, ortho_backward_kernel<T>)(static_cast<const T*>(p.grad),
				static_cast<const T*>(p.x), static_cast<T*>(p.out), static_cast<T*>(p.work), p.n, p.e, p.d, eps2);
	}
	return cudaGetLastError();
}

}  // namespace

cudaError_t launch_orthonormalize(const OrthoParams& p, cudaStream_t stream) {
	return p.f64 ? launch<double>(p, stream) : launch<float>(p, stream);
}

cudaError_t launch_orthonormalize_backward(const OrthoParams& p, cudaStream_t stream) {
	return p.f64 ? launch<double>(p, stream) : launch<float>(p, stream);
}

}  // namespace tdmpc2_moe
