// CPU kernel of the sampler-step family (csrc/sampler_coefficients.h): every sampler, one loop; a rescaled guided
// step runs the guidance reduction first (cpu/guidance.h).
#include <vector>

#include "guidance.h"
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
    const int64_t B = call.x_t.size(0);
    std::vector<double> sums;
    with_sampler(call.step.sampler, [&](auto S) {
      with_param(call.step.param, [&](auto P) {
        with_bool(call.guided(), [&](auto G) {
          auto f = SamplerKernel<scalar_t, decltype(S), decltype(P), decltype(G)>::make(call, S, P, G);
          prepare_rescale(f.guide, B, sums);
          run_family<scalar_t>(f, numel, numel / B, Noise(spec));
        });
      });
    });
  });
}

}  // namespace ddpm::cpu::CPU_CAPABILITY
