// CPU kernel of the pair-op family (csrc/pair_ops.h).
#include "kernels.h"
#include "loops.h"

namespace ddpm::cpu::CPU_CAPABILITY {

// x and y of different dtypes (float32, float16, bfloat16) are read each in its own; out in float32.
void Kernels::pair(const PairCall& call) {
  const int64_t numel = call.x.numel();
  dispatch_operands(call.x.scalar_type(), mixed_operands({&call.x, call.y}), [&](auto S, auto Ps, auto IO) {
    using scalar_t = typename decltype(S)::type;
    run_family_io<typename decltype(IO)::type>(PairKernel<scalar_t, typename decltype(Ps)::type>::make(call), numel,
                                               numel / call.x.size(0));
  });
}

}  // namespace ddpm::cpu::CPU_CAPABILITY
