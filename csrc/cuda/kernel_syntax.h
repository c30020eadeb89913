// The two pieces of CUDA syntax in the kernels that a plain C++ compiler cannot parse: the <<<...>>>
// launch and `extern __shared__` (dynamic shared memory). With nvcc these macros are CUDA's own syntax,
// so the .cu files are the kernels that ship either way; a build that defines the macros first gets its
// own launch instead (tests/ops/emulator compiles the .cu files for the CPU and runs them on the SIMT
// emulator HIP-CPU, see docs/gpu.md).
#pragma once

#ifndef TDMPC2_LAUNCH
// TDMPC2_LAUNCH(grid, block, shared_bytes, stream, kernel)(args...) is
// kernel<<<grid, block, shared_bytes, stream>>>(args...). The kernel comes last: a template's
// argument list holds commas, which only a variadic macro parameter keeps together.
#define TDMPC2_LAUNCH(grid, block, shared_bytes, stream, ...) __VA_ARGS__<<<grid, block, shared_bytes, stream>>>
#endif

#ifndef TDMPC2_DYNAMIC_SHARED
// Declares `name`, the block's dynamic shared memory (the launch's shared_bytes), as an array of type.
#define TDMPC2_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#endif
