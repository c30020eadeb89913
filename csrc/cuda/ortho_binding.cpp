// CUDA dispatch of the orthonormalisation ops: binding_impl.h (checks, outputs, workspace, launch) run
// under the CUDA device guard on the current stream; the kernels are in ortho_kernels.cu. Compiled only
// in CUDA builds (setup.py).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "binding_impl.h"

namespace tdmpc2_moe {
namespace {

struct CudaBuild : binding::BuildDefaults {
	using Guard = c10::cuda::CUDAGuard;
	static cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }
};

}  // namespace
}  // namespace tdmpc2_moe

TORCH_LIBRARY_IMPL(tdmpc2_moe, CUDA, m) {
	using tdmpc2_moe::CudaBuild;
	namespace binding = tdmpc2_moe::binding;
	m.impl("orthonormalize", &binding::orthonormalize<CudaBuild>);
	m.impl("orthonormalize_backward", &binding::orthonormalize_backward<CudaBuild>);
}
