// Stands in for CUDA's <cuda_fp16.h> in the emulator build (tests/ops/emulator): HIP-CPU's __half, with the
// same names for the conversions the kernels use (__float2half, round to nearest even; __half2float).
#pragma once

#include "tdmpc2_simt_emulator.h"
