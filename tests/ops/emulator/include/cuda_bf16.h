// Stands in for CUDA's <cuda_bf16.h> in the emulator build (tests/ops/emulator), which HIP-CPU lacks:
// __nv_bfloat16 and the two conversions the kernels use, with CUDA's semantics (float -> bfloat16
// rounds to nearest even; a NaN stays a NaN).
#pragma once

#include <cstdint>
#include <cstring>

struct __nv_bfloat16 {
	uint16_t bits = 0;
};

inline __nv_bfloat16 __float2bfloat16(float v) {
	uint32_t u;
	std::memcpy(&u, &v, sizeof(u));
	__nv_bfloat16 r;
	if ((u & 0x7fffffffu) > 0x7f800000u) {
		r.bits = 0x7fff;  // CUDA's canonical NaN
		return r;
	}
	u += 0x7fffu + ((u >> 16) & 1u);
	r.bits = static_cast<uint16_t>(u >> 16);
	return r;
}

inline float __bfloat162float(__nv_bfloat16 v) {
	const uint32_t u = static_cast<uint32_t>(v.bits) << 16;
	float r;
	std::memcpy(&r, &u, sizeof(r));
	return r;
}
