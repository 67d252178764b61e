// CUDA kernel of the posterior family (csrc/posterior.h): q_posterior, p_mean_variance, p_sample; var and
// log_var in the same launch.
#include <c10/cuda/CUDAGuard.h>

#include "kernels.h"
#include "launch.cuh"

namespace ddpm::cuda {

// A call whose x_t, model_output and noise have different dtypes computes in float32 and reads each in its own
// (csrc/mixed.h); the output has the promoted dtype, float32.
void Kernels::posterior(const PosteriorCall& call) {
  c10::cuda::CUDAGuard guard(call.x_t.device());
  const int64_t B = call.x_t.size(0), numel = call.x_t.numel(), N = numel == 0 ? 0 : numel / B;
  const bool mixed = mixed_operands({&call.x_t, &call.model_output, call.noise});
  dispatch_operands(call.x_t.scalar_type(), mixed, [&](auto S, auto Ps) {
    using scalar_t = typename decltype(S)::type;
    using Ptrs = typename decltype(Ps)::type;
    run_family<scalar_t, Ptrs>(PosteriorKernel<scalar_t, Param, bool, Ptrs>::make(call, call.param, call.clip), numel,
                               N, {&call.x_t, &call.model_output, &call.out}, call.noise, call.sample, call.generator,
                               call.sample_offset, call.var != nullptr ? B : 0);
  });
}

}  // namespace ddpm::cuda
