// CPU kernel of the sampler-step family (csrc/sampler_coefficients.h): every sampler, one loop.
#include "kernels.h"
#include "loops.h"
#include "noise.h"

namespace ddpm::cpu::CPU_CAPABILITY {

void Kernels::sampler_step(const SamplerCall& call) {
  const int64_t numel = call.x_t.numel();
  DDPM_DISPATCH_FLOATING(call.x_t.scalar_type(), "ddpm_kernels_sampler_step", [&] {
    using Noise = CpuNoise<scalar_t>;
    // p_sample's scheme, so a step and a p_sample from the same generator state draw the same normals.
    const typename Noise::Spec spec = Noise::spec(call.noise, call.step.add_noise, call.generator, call.x_t, call.sample_offset);
    if (numel == 0) return;
    with_sampler(call.step.sampler, [&](auto S) {
      with_param(call.step.param, [&](auto P) {
        run_family<scalar_t>(SamplerKernel<scalar_t, decltype(S), decltype(P)>::make(call, S, P), numel,
                             numel / call.x_t.size(0), Noise(spec));
      });
    });
  });
}

}  // namespace ddpm::cpu::CPU_CAPABILITY
