// The lane kernels compiled for AVX-512 (F, VL, DQ, BW) + FMA (x86-64 with GCC or Clang only),
// chosen at run time by lane_kernels() when the CPU has them.
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")
#define TDMPC2_LANES_NS avx512
#include "lanes_impl.h"

namespace tdmpc2_moe {

LaneKernels lane_kernels_avx512() {
	return avx512::kernels("avx512");
}

}  // namespace tdmpc2_moe
#endif
