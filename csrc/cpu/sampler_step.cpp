// CPU kernel of the sampler-step family (csrc/sampler_coefficients.h): every sampler, one loop; a rescaled guided
// step runs the guidance reduction first (cpu/guidance.h).
#include <vector>

#include "guidance.h"
#include "kernels.h"
#include "loops.h"
#include "noise.h"

namespace ddpm::cpu::CPU_CAPABILITY {

// A call whose x_t, model_output (and uncond) and noise have different dtypes computes in float32 and reads each
// in its own (csrc/cpu/loops.h, MixedLanes; the autocast mix, float32 data with float16 / bfloat16 model outputs,
// typed: AutocastPtrs); its outputs have the promoted dtype, float32.
void Kernels::sampler_step(const SamplerCall& call) {
  const int64_t numel = call.x_t.numel();
  // (out: the promoted dtype, which an unread noise operand of another dtype may also have set)
  // p_sample's noise scheme, so a step and a p_sample from the same generator state draw the same normals
  dispatch_step_with_noise({&call.model_output, call.uncond}, {&call.x_t, call.noise, &call.out, call.x0}, call.x_t,
                           call.noise, call.step.add_noise, call.generator, call.sample_offset,
                           [&](auto St, auto Ps, auto IO, const auto& z) {
    using scalar_t = typename decltype(St)::type;
    using Ptrs = typename decltype(Ps)::type;
    using L = typename decltype(IO)::type;
    if (numel == 0) return;
    const int64_t B = call.x_t.size(0);
    std::vector<double> sums;
    with_sampler(call.step.sampler, [&](auto S) {
      with_param(call.step.param, [&](auto P) {
        with_bool(call.guided(), [&](auto G) {
          with_bool(call.step.learned, [&](auto Lv) {
            using F = SamplerKernel<scalar_t, decltype(S), decltype(P), decltype(G), decltype(Lv), Ptrs>;
            auto f = F::make(call, S, P, G, Lv);
            prepare_rescale(f.guide, B, sums);
            run_family_io<L>(f, numel, numel / B, z);
          });
        });
      });
    });
  });
}

}  // namespace ddpm::cpu::CPU_CAPABILITY
