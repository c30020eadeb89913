// CUDA dispatch of the routed-experts ops: routed_experts_binding_impl.h (checks, outputs, saved layout,
// workspace, launch) run under the CUDA device guard on the current stream; the kernels are in
// routed_experts_kernels.cu. Compiled only in CUDA builds (setup.py).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "routed_experts_binding_impl.h"

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
	m.impl("routed_experts", &binding::routed_experts<CudaBuild>);
	m.impl("routed_experts_train", &binding::routed_experts_train<CudaBuild>);
	m.impl("routed_experts_backward", &binding::routed_experts_backward<CudaBuild>);
}
