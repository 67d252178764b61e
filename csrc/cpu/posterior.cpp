// CPU kernel of the posterior family (csrc/posterior.h): q_posterior, p_mean_variance, p_sample.
#include "kernels.h"
#include "loops.h"
#include "noise.h"

namespace ddpm::cpu::CPU_CAPABILITY {

// A call whose x_t, model_output and noise have different dtypes computes in float32 and reads each in its own
// (csrc/cpu/loops.h, MixedLanes); the output has the promoted dtype, float32.
void Kernels::posterior(const PosteriorCall& call) {
  const int64_t B = call.x_t.size(0), numel = call.x_t.numel();
  dispatch_with_noise({&call.x_t, &call.model_output, call.noise}, call.x_t, call.noise, call.sample, call.generator,
                      call.sample_offset, [&](auto S, auto Ps, auto IO, const auto& z) {
    using scalar_t = typename decltype(S)::type;
    using Ptrs = typename decltype(Ps)::type;
    with_param_and_bool(call.param, call.clip, [&](auto P, auto C) {
      const auto f = PosteriorKernel<scalar_t, decltype(P), decltype(C), Ptrs>::make(call, P, C);
      for (int64_t b = 0; b < B; ++b) f.per_sample(b);
      if (numel > 0) run_family_io<typename decltype(IO)::type>(f, numel, numel / B, z);
    });
  });
}

}  // namespace ddpm::cpu::CPU_CAPABILITY
