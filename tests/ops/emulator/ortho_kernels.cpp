// The shipped CUDA kernels of the orthonormalisation (csrc/cuda/ortho_kernels.cu), compiled unchanged as
// C++ for the SIMT emulator (see topk_gate_kernels.cpp).
#include "tdmpc2_simt_emulator.h"

#include "cuda/ortho_kernels.cu"
