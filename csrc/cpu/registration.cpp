// The CPU kernels' registration and the library's Python module (csrc/module.h).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <memory>

#include "kernels.h"

#include "../host_ops.h"
#include "../module.h"

namespace ddpm {
// The CPU kernels read float32, float16 and bfloat16 operands of one call each in its own dtype (the ops that
// call check_operand: the pair ops, the posterior family and the loss; csrc/cpu/loops.h, MixedLanes).
template <>
struct ReadsMixed<cpu::CPU_CAPABILITY::Kernels> : std::true_type {};
}  // namespace ddpm

namespace ddpm::cpu::CPU_CAPABILITY {
namespace {

// TORCH_LIBRARY_IMPL(ddpm_kernels, CPU, m), registered only if no other build of these kernels already serves
// the CPU key: the per-ISA libraries are alternatives, and loading a second one (by importing it directly)
// must not silently replace the kernels the process is using.
struct CpuRegistration {
  std::unique_ptr<torch::Library> lib;
  CpuRegistration() {
    auto op = c10::Dispatcher::singleton().findOp(c10::OperatorName("ddpm_kernels::p_sample", ""));
    if (op.has_value() && op->hasKernelForDispatchKey(c10::DispatchKey::CPU)) return;
    lib = std::make_unique<torch::Library>(torch::Library::IMPL, "ddpm_kernels", c10::DispatchKey::CPU, __FILE__,
                                           __LINE__);
    register_kernels<Kernels>(*lib);
  }
};
const CpuRegistration cpu_registration;

}  // namespace
}  // namespace ddpm::cpu::CPU_CAPABILITY
