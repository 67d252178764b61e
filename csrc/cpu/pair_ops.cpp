// CPU kernel of the pair-op family (csrc/pair_ops.h).
#include "kernels.h"
#include "loops.h"

namespace ddpm::cpu::CPU_CAPABILITY {

void Kernels::pair(const PairCall& call) {
  const int64_t numel = call.x.numel();
  DDPM_DISPATCH_FLOATING(call.x.scalar_type(), "ddpm_kernels_pair", [&] {
    run_family<scalar_t>(PairKernel<scalar_t>::make(call), numel, numel / call.x.size(0));
  });
}

}  // namespace ddpm::cpu::CPU_CAPABILITY
