// The activations of the routed experts' layers (routed_experts.h), per element, forward and backward,
// that both backends run (__host__ __device__): the CPU kernels (cpu/routed_experts.cpp) in their row
// loops, the CUDA kernels (cuda/routed_experts_kernels.cu) per thread. Also the activation codes and the
// LayerNorm epsilon, here rather than in routed_experts.h because the .cu cannot include torch headers.
// Mish is written with one exponential: tanh(softplus(a)) = n / (n + 2) with n = e^a (e^a + 2), and from
// a > 20 it is `a` itself (as torch's softplus threshold: tanh(softplus(20)) rounds to 1 in float32 and
// float64), so n never overflows.
#pragma once

#include <math.h>

#include "gate_row.h"

#if defined(__CUDACC__)
#define EXPERT_HD __host__ __device__ __forceinline__
#else
#define EXPERT_HD inline __attribute__((always_inline))
#endif

namespace tdmpc2_moe {

// What follows a layer's Linear (+ bias): nothing (a plain Linear), or LayerNorm then Mish, or LayerNorm
// then SimNorm (softmax over groups of simnorm_dim features: TD-MPC2's dynamics head).
enum class ExpertAct : int64_t { kNone = 0, kMish = 1, kSimNorm = 2 };

// nn.LayerNorm's default epsilon, which ExpertLinear's F.layer_norm uses.
constexpr double kExpertNormEps = 1e-5;

// e^a: float32 through gate_exp (vectorisable on the host, expf on the device), float64 through exp.
EXPERT_HD float expert_exp(float a) {
	return gate_exp(a);
}

EXPERT_HD double expert_exp(double a) {
	return exp(a);
}

constexpr float kMishLinearFrom = 20.f;

// Whether mish(a) is computed by its formula (not linear): NaN included, so that it propagates.
template <typename T>
EXPERT_HD bool expert_mish_curved(T a) {
	return !(a >= T(kMishLinearFrom));
}

template <typename T>
EXPERT_HD T expert_mish(T a) {
	const bool curved = expert_mish_curved(a);
	const T u = expert_exp(curved ? a : T(0));
	const T n = u * (u + T(2));
	return curved ? a * n / (n + T(2)) : a;
}

// d mish(a) / da = tanh(sp) + a sech^2(sp) sigmoid(a), sp = softplus(a); 1 where mish is linear.
template <typename T>
EXPERT_HD T expert_mish_grad(T a) {
	const bool curved = expert_mish_curved(a);
	const T u = expert_exp(curved ? a : T(0));
	const T n = u * (u + T(2));
	const T t = n / (n + T(2));
	const T sigmoid = u / (u + T(1));
	return curved ? t + a * (T(1) - t * t) * sigmoid : T(1);
}

}  // namespace tdmpc2_moe
