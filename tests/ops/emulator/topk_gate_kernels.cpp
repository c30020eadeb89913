// The shipped CUDA kernels of top-k gating (csrc/cuda/topk_gate.cu), compiled unchanged as C++ for the
// SIMT emulator (include/tdmpc2_simt_emulator.h defines the launch and dynamic shared memory macros of
// csrc/cuda/kernel_syntax.h first, and include/cuda_*.h stand in for CUDA's headers). A translation unit
// of its own: the .cu files each define names in an anonymous namespace that would collide.
#include "tdmpc2_simt_emulator.h"

#include "cuda/topk_gate.cu"
