// CPU kernel of the posterior family (csrc/posterior.h): q_posterior, p_mean_variance, p_sample.
#include "kernels.h"
#include "loops.h"
#include "noise.h"

namespace ddpm::cpu::CPU_CAPABILITY {

// A call whose x_t, model_output and noise have different dtypes computes in float32 and reads each in its own
// (csrc/cpu/loops.h, MixedLanes); the output has the promoted dtype, float32.
void Kernels::posterior(const PosteriorCall& call) {
  const int64_t B = call.x_t.size(0), numel = call.x_t.numel();
  const bool mixed = mixed_operands({&call.x_t, &call.model_output, call.noise});
  dispatch_operands(call.x_t.scalar_type(), mixed, [&](auto S, auto Ps, auto IO) {
    using scalar_t = typename decltype(S)::type;
    using Ptrs = typename decltype(Ps)::type;
    using L = typename decltype(IO)::type;
    using Noise = CpuNoise<scalar_t, L, Ptrs>;
    const typename Noise::Spec spec = Noise::spec(call.noise, call.sample, call.generator, call.x_t, call.sample_offset);
    with_param_and_bool(call.param, call.clip, [&](auto P, auto C) {
      const auto f = PosteriorKernel<scalar_t, decltype(P), decltype(C), Ptrs>::make(call, P, C);
      for (int64_t b = 0; b < B; ++b) f.per_sample(b);
      if (numel > 0) run_family_io<L>(f, numel, numel / B, Noise(spec));
    });
  });
}

}  // namespace ddpm::cpu::CPU_CAPABILITY
