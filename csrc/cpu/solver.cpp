// CPU kernel of the multistep-solver family (csrc/solver.h): one pass of the family loop over at::vec lanes; a
// rescaled guided step runs the guidance reduction first (cpu/guidance.h). The ring's H is a constant up to
// kCoefSlots (its walk unrolled, every coefficient from the per-sample Coef), a runtime value beyond.
#include <type_traits>
#include <vector>

#include "guidance.h"
#include "kernels.h"
#include "loops.h"
#include "noise.h"

#include "../solver.h"

namespace ddpm::cpu::CPU_CAPABILITY {
namespace {

// f(std::integral_constant<int64_t, H>()) for H <= kCoefSlots, else f(H).
template <int64_t H = 0, typename F>
void with_slots(int64_t slots, const F& f) {
  if constexpr (H > kCoefSlots) {
    f(slots);
  } else {
    if (slots == H) return f(std::integral_constant<int64_t, H>());
    with_slots<H + 1>(slots, f);
  }
}

}  // namespace

void Kernels::solver_step(const SolverStepCall& call) {
  const int64_t numel = call.sample.numel();
  // a call whose sample, model outputs and noise have different dtypes computes in float32 and reads each in its
  // own (csrc/cpu/loops.h, MixedLanes; the autocast mix, float32 data with float16 / bfloat16 model outputs,
  // typed: AutocastPtrs, the model outputs read through Guidance's model_in); out and the state have the
  // promoted dtype, float32. Float32 runs in two-vector slices too (kWide): the branches on the live terms are
  // paid once per slice
  dispatch_step_with_noise<true>({&call.model_output, call.uncond}, {&call.sample, call.noise, &call.out},
                                 call.sample, call.noise, call.stochastic, call.generator, call.sample_offset,
                                 [&](auto St, auto Ps, auto IO, const auto& z) {
    using scalar_t = typename decltype(St)::type;
    using Ptrs = typename decltype(Ps)::type;
    using L = typename decltype(IO)::type;
    if (numel == 0) return;
    const int64_t B = call.sample.size(0);
    std::vector<double> sums;
    with_bool(call.guided(), [&](auto G) {
      with_bool(call.clip_range.has_value(), [&](auto C) {
        with_slots(call.history != nullptr ? call.history->size(0) : 0, [&](auto H) {
          auto f = SolverStepKernel<scalar_t, decltype(G), decltype(C), decltype(H), Ptrs>::make(call, G, C, H);
          prepare_rescale(f.guide, B, sums);
          run_family_io<L>(f, numel, numel / B, z);
        });
      });
    });
  });
}

}  // namespace ddpm::cpu::CPU_CAPABILITY
