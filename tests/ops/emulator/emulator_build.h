// The emulator's Build policy of the CUDA bindings (csrc/cuda/binding_impl.h): what the test-only ops of
// emulated_ops.cpp and emulated_experts_ops.cpp run the bindings' own code with. Include after the torch
// headers (the emulator's cuda_runtime.h brings HIP-CPU's macros).
#pragma once

#include "cuda/routed_experts_binding_impl.h"  // binding_impl.h and the routed experts' binding code

#include <mutex>
#include <string>
#include <utility>

namespace tdmpc2_moe {
namespace {

struct EmulatorBuild : binding::BuildDefaults {
	struct Guard {
		explicit Guard(at::Device) {}  // CPU tensors: no device to make current
	};

	static cudaStream_t stream() { return nullptr; }  // ignored: launches run to completion

	// Every bit set (NaN in a float, the largest ticket): fresh host memory is often zero where the
	// caching allocator's is not, and the kernels must neither read a partial before writing it nor find
	// the ticket zeroed by luck rather than by the launcher's memset.
	static at::Tensor workspace(const at::Tensor& like, at::IntArrayRef sizes, at::ScalarType dtype) {
		at::Tensor work = BuildDefaults::workspace(like, sizes, dtype);
		work.view(at::kByte).fill_(0xff);
		return work;
	}

	// The emulator records a fault (barrier divergence, a partial warp shuffle) where a GPU would fault
	// or hang: it is taken here, before the launch error.
	static void check_launch(cudaError_t err) {
		std::string fault;
		{
			auto& r = tdmpc2_moe_emu::record();
			std::lock_guard<std::mutex> lock(r.mutex);
			fault = std::exchange(r.fault, std::string());
		}
		TORCH_CHECK(fault.empty(), "tdmpc2_moe emulated kernel fault: ", fault);
		BuildDefaults::check_launch(err);
	}
};

}  // namespace
}  // namespace tdmpc2_moe
