// Run-time choice of the lane kernels' instruction set.
#include "lanes.h"

#include <stdlib.h>
#include <string.h>

namespace tdmpc2_moe {

const LaneKernels& lane_kernels() {
	static const LaneKernels chosen = [] {
#if defined(__x86_64__) && defined(__GNUC__)
		// TDMPC2_MOE_CPU_ISA=generic forces the baseline build (to test or time it on an AVX2 machine).
		const char* cap = getenv("TDMPC2_MOE_CPU_ISA");
		const bool generic_only = cap && strcmp(cap, "generic") == 0;
		__builtin_cpu_init();
		if (!generic_only && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return lane_kernels_avx2();
#endif
		return lane_kernels_generic();
	}();
	return chosen;
}

}  // namespace tdmpc2_moe
