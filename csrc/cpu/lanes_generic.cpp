// The lane kernels for any CPU, with the compiler's baseline instruction set (SSE2 on x86-64).
#define TDMPC2_LANES_NS generic
#include "lanes_impl.h"

namespace tdmpc2_moe {

LaneKernels lane_kernels_generic() {
	return generic::kernels("generic");
}

}  // namespace tdmpc2_moe
