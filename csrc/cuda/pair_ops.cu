// CUDA kernel of the pair-op family (csrc/pair_ops.h).
#include <c10/cuda/CUDAGuard.h>

#include "kernels.h"
#include "launch.cuh"

namespace ddpm::cuda {

// x and y of different dtypes (float32, float16, bfloat16) are read each in its own; out in float32.
void Kernels::pair(const PairCall& call) {
  c10::cuda::CUDAGuard guard(call.x.device());
  const int64_t numel = call.x.numel();
  dispatch_operands(call.x.scalar_type(), mixed_operands({&call.x, call.y}), [&](auto S, auto Ps) {
    using scalar_t = typename decltype(S)::type;
    run_family<scalar_t>(PairKernel<scalar_t, typename decltype(Ps)::type>::make(call), numel,
                         numel / call.x.size(0), {&call.x, call.y, &call.out, call.out2});
  });
}

}  // namespace ddpm::cuda
