// CUDA kernel of the multistep-solver family (csrc/solver.h): the family kernel (launch.cuh), one launch; a
// rescaled guided step runs the guidance reduction first (cuda/guidance.cuh). Flags are runtime values (uniform
// branches): one instantiation per dtype, and one for a call whose operands have different dtypes.
#include <c10/cuda/CUDAGuard.h>

#include "guidance.cuh"
#include "kernels.h"
#include "launch.cuh"

#include "../solver.h"

namespace ddpm::cuda {

void Kernels::solver_step(const SolverStepCall& call) {
  const int64_t numel = call.sample.numel();
  c10::cuda::CUDAGuard guard(call.sample.device());  // first: sm_count() reads the current device
  const bool draw = call.stochastic && call.noise == nullptr;
  if (numel == 0) {
    // a drawing call consumes the generator whatever the batch size, as on every backend
    if (draw) take_stream_state(call.generator);
    return;
  }
  const int64_t B = call.sample.size(0), N = numel / B;
  // sample, model outputs and noise of different dtypes: float32, each read in its own (csrc/mixed.h); out and
  // the state have the promoted dtype, float32
  const bool mixed = mixed_operands({&call.sample, &call.model_output, call.uncond, call.noise, &call.out});
  dispatch_operands(call.sample.scalar_type(), mixed, [&](auto S, auto Ps) {
    using scalar_t = typename decltype(S)::type;
    using Ptrs = typename decltype(Ps)::type;
    using F = SolverStepKernel<scalar_t, bool, bool, int64_t, Ptrs>;
    static_assert(sizeof(typename F::Coef) * kThreads <= 48 * 1024,
                  "a tile's Coef cache (launch.cuh) must fit in static shared memory");
    auto f = F::make(call, call.guided(), call.clip_range.has_value(),
                     call.history != nullptr ? call.history->size(0) : int64_t(0));
    const at::Tensor sums = prepare_rescale(f.guide, B, call.sample.options());
    // packets need every slot of the ring aligned: its base and one slot stride on
    const scalar_t* ring = call.history != nullptr ? call.history->const_data_ptr<scalar_t>() : nullptr;
    const Operand ring_next(ring != nullptr ? ring + numel : nullptr, sizeof(scalar_t));
    run_family<scalar_t, Ptrs>(f, numel, N,
                               {&call.sample, &call.model_output, call.uncond, &call.out, call.history, ring_next,
                                call.last_sample},
                               call.noise, call.stochastic, call.generator, call.sample_offset);
  });
}

}  // namespace ddpm::cuda
