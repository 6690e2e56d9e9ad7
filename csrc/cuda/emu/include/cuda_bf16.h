// Stub of the CUDA header <cuda_bf16.h> for the CPU emulation of the kernels (csrc/cuda/README.md): the build
// puts csrc/cuda/emu on the include path, and the shim there supplies what the kernels use.
#pragma once
#include "cuda_emu.h"
