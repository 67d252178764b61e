// The CPU backend: csrc/backend.h's Kernels, defined by family in cpu/pair_ops.cpp, cpu/posterior.cpp,
// cpu/sampler_step.cpp and cpu/loss.cpp, registered in cpu/registration.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include "../flow.h"
#include "../loss.h"
#include "../pair_ops.h"
#include "../posterior.h"
#include "../sampler_coefficients.h"
#include "../solver.h"

namespace ddpm::cpu::CPU_CAPABILITY {
#include "../backend.h"
}  // namespace ddpm::cpu::CPU_CAPABILITY
