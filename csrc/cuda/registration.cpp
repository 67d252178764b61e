// TORCH_LIBRARY_IMPL(ddpm_kernels, CUDA, m): every operator's host side (csrc/host_ops.h) on the CUDA kernels.
#include <torch/library.h>

#include "kernels.h"

#include "../host_ops.h"

namespace ddpm {
// The CUDA kernels read float32, float16 and bfloat16 operands of one call each in its own dtype, as the CPU
// kernels (the ops that call check_operand; csrc/mixed.h, and launch.cuh's PacketIO).
template <>
struct ReadsMixed<cuda::Kernels> : std::true_type {};
}  // namespace ddpm

TORCH_LIBRARY_IMPL(ddpm_kernels, CUDA, m) { ddpm::register_kernels<ddpm::cuda::Kernels>(m); }
