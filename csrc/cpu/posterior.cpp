// CPU kernel of the posterior family (csrc/posterior.h): q_posterior, p_mean_variance, p_sample.
#include "kernels.h"
#include "loops.h"
#include "noise.h"

namespace ddpm::cpu::CPU_CAPABILITY {

void Kernels::posterior(const PosteriorCall& call) {
  const int64_t B = call.x_t.size(0), numel = call.x_t.numel();
  DDPM_DISPATCH_FLOATING(call.x_t.scalar_type(), "ddpm_kernels_posterior", [&] {
    using Noise = CpuNoise<scalar_t>;
    const typename Noise::Spec spec = Noise::spec(call.noise, call.sample, call.generator, call.x_t, call.sample_offset);
    with_param_and_bool(call.param, call.clip, [&](auto P, auto C) {
      const auto f = PosteriorKernel<scalar_t, decltype(P), decltype(C)>::make(call, P, C);
      for (int64_t b = 0; b < B; ++b) f.per_sample(b);
      if (numel > 0) run_family<scalar_t>(f, numel, numel / B, Noise(spec));
    });
  });
}

}  // namespace ddpm::cpu::CPU_CAPABILITY
