// The lane kernels compiled for AVX2 + FMA (x86-64 with GCC or Clang only), chosen at run time by
// lane_kernels() when the CPU has them; the build itself still runs on any x86-64.
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx2,fma")
#define TDMPC2_LANES_NS avx2
#include "lanes_impl.h"

namespace tdmpc2_moe {

LaneKernels lane_kernels_avx2() {
	return avx2::kernels("avx2");
}

}  // namespace tdmpc2_moe
#endif
