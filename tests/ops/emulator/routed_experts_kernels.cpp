// The shipped CUDA kernels of the routed experts (csrc/cuda/routed_experts_kernels.cu), compiled unchanged
// as C++ for the SIMT emulator (see topk_gate_kernels.cpp), and, after them, this test build's planted
// bugs in their weight gradient (routed_experts_planted.h): never part of the shipped extension.
//   kMissingLoadBarrier: the shipped weight_grad_kernel itself, instantiated with a tile-barrier policy
//     whose barrier after the tile's loads does nothing (a thread multiplies shared-memory entries that
//     other threads have not loaded yet, or have already replaced with the next tile's).
//   kFloatAtomics: a weight gradient in which each block adds its rows' products into dw with float
//     atomicAdd, the pattern the shipped kernels avoid: the rounding depends on the order of the blocks.
#include "tdmpc2_simt_emulator.h"

#include "cuda/routed_experts_kernels.cu"

#include "routed_experts_planted.h"

namespace tdmpc2_moe_emu_planted {
namespace {

struct MissingLoadBarrier {
	static void after_load() {}  // the bug: no __syncthreads() between the tile's loads and its use
	static void after_use() { __syncthreads(); }
};

constexpr int kRowsPerBlock = 16;

// Block b adds the products of sorted rows [16 b, 16 b + 16) into dw (zeroed by the caller), one
// atomicAdd per row and output element.
__global__ void float_atomics_weight_grad(const float* g, const float* h, float* dw, const int64_t* offsets, int e,
		int64_t s, int64_t out, int64_t in) {
	for (int64_t p = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock;
			p < s && p < static_cast<int64_t>(blockIdx.x + 1) * kRowsPerBlock; ++p) {
		int ex = 0;
		while (ex + 1 < e && offsets[ex + 1] <= p) ++ex;
		for (int64_t i = threadIdx.x; i < out * in; i += blockDim.x)
			atomicAdd(dw + ex * out * in + i, g[p * out + i / in] * h[p * in + i % in]);  // the bug
	}
}

}  // namespace

void weight_grad(Variant variant, const float* g, const float* h, float* dw, const int64_t* offsets, int e,
		int64_t s, int64_t out, int64_t in) {
	namespace re = tdmpc2_moe;
	const int64_t out_tiles = (out + re::kTileM - 1) / re::kTileM, in_tiles = (in + re::kTileN - 1) / re::kTileN;
	const unsigned blocks = static_cast<unsigned>(e * out_tiles * in_tiles);
	switch (variant) {
		case Variant::kShipped:
			TDMPC2_LAUNCH(blocks, re::kThreads, 0, nullptr, re::weight_grad_kernel<float, re::TileBarriers>)(g, h, dw,
					offsets, out, in, out_tiles, in_tiles);
			break;
		case Variant::kMissingLoadBarrier:
			TDMPC2_LAUNCH(blocks, re::kThreads, 0, nullptr, re::weight_grad_kernel<float, MissingLoadBarrier>)(g, h, dw,
					offsets, out, in, out_tiles, in_tiles);
			break;
		case Variant::kFloatAtomics:
			if (s > 0)
				TDMPC2_LAUNCH(static_cast<unsigned>((s + kRowsPerBlock - 1) / kRowsPerBlock), 64, 0, nullptr,
						float_atomics_weight_grad)(g, h, dw, offsets, e, s, out, in);
			break;
	}
}

}  // namespace tdmpc2_moe_emu_planted
