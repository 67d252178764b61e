// The CUDA backend: csrc/backend.h's Kernels, defined by family in cuda/pair_ops.cu, cuda/posterior.cu,
// cuda/sampler_step.cu and cuda/loss.cu, registered in cuda/registration.cpp. Each launches on the current
// stream of the data's device.
#pragma once

#include <ATen/core/Tensor.h>

#include "../flow.h"
#include "../loss.h"
#include "../pair_ops.h"
#include "../posterior.h"
#include "../sampler_coefficients.h"
#include "../solver.h"

namespace ddpm::cuda {
#include "../backend.h"
}  // namespace ddpm::cuda
