// Stands in for CUDA's <cuda_runtime.h> in the emulator build (tests/ops/emulator): the runtime names the
// kernels' launchers use (csrc/cuda/launch.h, ortho_launch.h and the .cu files), on HIP-CPU.
#pragma once

#include "tdmpc2_simt_emulator.h"

using cudaStream_t = hipStream_t;  // ignored: every launch runs to completion before it returns
using cudaError_t = hipError_t;
constexpr cudaError_t cudaSuccess = hipSuccess;

// In stream order by construction: launches are synchronous.
inline cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t) {
	std::memset(p, value, bytes);
	return cudaSuccess;
}

inline cudaError_t cudaGetLastError() {
	return ::tdmpc2_moe_emu::take_launch_error();
}

inline const char* cudaGetErrorString(cudaError_t e) {
	return hipGetErrorString(e);
}
