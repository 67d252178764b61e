// CUDA kernel of the pair-op family (csrc/pair_ops.h).
#include <c10/cuda/CUDAGuard.h>

#include "kernels.h"
#include "launch.cuh"

namespace ddpm::cuda {

void Kernels::pair(const PairCall& call) {
  c10::cuda::CUDAGuard guard(call.x.device());
  const int64_t numel = call.x.numel();
  DDPM_DISPATCH_FLOATING(call.x.scalar_type(), "ddpm_kernels_pair_cuda", [&] {
    run_family<scalar_t>(PairKernel<scalar_t>::make(call), numel, numel / call.x.size(0),
                         {call.x.const_data_ptr(), call.y != nullptr ? call.y->const_data_ptr() : nullptr,
                          call.out.const_data_ptr(), call.out2 != nullptr ? call.out2->const_data_ptr() : nullptr});
  });
}

}  // namespace ddpm::cuda
