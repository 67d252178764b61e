// TORCH_LIBRARY_IMPL(ddpm_kernels, CUDA, m): every operator's host side (csrc/host_ops.h) on the CUDA kernels.
#include <torch/library.h>

#include "kernels.h"

#include "../host_ops.h"

TORCH_LIBRARY_IMPL(ddpm_kernels, CUDA, m) { ddpm::register_kernels<ddpm::cuda::Kernels>(m); }
