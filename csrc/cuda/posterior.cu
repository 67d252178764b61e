// CUDA kernel of the posterior family (csrc/posterior.h): q_posterior, p_mean_variance, p_sample; var and
// log_var in the same launch.
#include <c10/cuda/CUDAGuard.h>

#include "kernels.h"
#include "launch.cuh"

namespace ddpm::cuda {

void Kernels::posterior(const PosteriorCall& call) {
  c10::cuda::CUDAGuard guard(call.x_t.device());
  const int64_t B = call.x_t.size(0), numel = call.x_t.numel(), N = numel == 0 ? 0 : numel / B;
  DDPM_DISPATCH_FLOATING(call.x_t.scalar_type(), "ddpm_kernels_posterior_cuda", [&] {
    run_family<scalar_t>(PosteriorKernel<scalar_t, Param, bool>::make(call, call.param, call.clip), numel, N,
                         {call.x_t.const_data_ptr(), call.model_output.const_data_ptr(), call.out.const_data_ptr()},
                         call.noise, call.sample, call.generator, call.sample_offset, call.var != nullptr ? B : 0);
  });
}

}  // namespace ddpm::cuda
