// Run-time choice of the lane kernels' instruction set.
#include "lanes.h"

#include <stdlib.h>
#include <string.h>

namespace tdmpc2_moe {

const LaneKernels& lane_kernels() {
	static const LaneKernels chosen = [] {
		// TDMPC2_MOE_CPU_ISA=generic|avx2|avx512 caps the choice (to test or time each build).
		const char* cap = getenv("TDMPC2_MOE_CPU_ISA");
		const bool allow_avx512 = !cap || strcmp(cap, "avx512") == 0;
		const bool allow_avx2 = allow_avx512 || strcmp(cap, "avx2") == 0;
		(void)allow_avx2;
#if defined(__x86_64__) && defined(__GNUC__)
		__builtin_cpu_init();
		if (allow_avx512 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
				__builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw"))
			return lane_kernels_avx512();
		if (allow_avx2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return lane_kernels_avx2();
#endif
		return lane_kernels_generic();
	}();
	return chosen;
}

}  // namespace tdmpc2_moe
