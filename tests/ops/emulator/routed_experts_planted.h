// The weight gradient of the routed experts' backward, dw[e] = g[rows of e]^T h[rows of e], as shipped and
// with a planted bug (routed_experts_kernels.cpp), on the emulator: float32, g [s, out], h [s, in] and
// offsets [e + 1] as routed_experts_train's saved[0] ends, dw [e, out, in] (zeroed by the caller for
// kFloatAtomics, which only adds). Exposed as tdmpc2_moe_emu::expert_weight_grad (emulated_experts_ops.cpp).
#pragma once

#include <stdint.h>

namespace tdmpc2_moe_emu_planted {

enum class Variant : int { kShipped = 0, kMissingLoadBarrier = 1, kFloatAtomics = 2 };

void weight_grad(Variant variant, const float* g, const float* h, float* dw, const int64_t* offsets, int e,
		int64_t s, int64_t out, int64_t in);

}  // namespace tdmpc2_moe_emu_planted
