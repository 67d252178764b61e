// CUDA kernel of the multistep-solver family (csrc/solver.h): the family kernel (launch.cuh), one launch; a
// rescaled guided step runs the guidance reduction first (cuda/guidance.cuh). Flags are runtime values (uniform
// branches): one instantiation per dtype.
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
  DDPM_DISPATCH_FLOATING(call.sample.scalar_type(), "ddpm_kernels_solver_step_cuda", [&] {
    using F = SolverStepKernel<scalar_t, bool, bool, int64_t>;
    static_assert(sizeof(typename F::Coef) * kThreads <= 48 * 1024,
                  "a tile's Coef cache (launch.cuh) must fit in static shared memory");
    auto f = F::make(call, call.guided(), call.clip_range.has_value(),
                     call.history != nullptr ? call.history->size(0) : int64_t(0));
    const at::Tensor sums = prepare_rescale(f.guide, B, call.sample.options());
    // packets need every slot of the ring aligned: its base and one slot stride on
    const void* ring = call.history != nullptr ? call.history->const_data_ptr() : nullptr;
    const void* ring_next = ring != nullptr ? static_cast<const scalar_t*>(ring) + numel : nullptr;
    run_family<scalar_t>(f, numel, N,
                         {call.sample.const_data_ptr(), call.model_output.const_data_ptr(),
                          call.uncond != nullptr ? call.uncond->const_data_ptr() : nullptr, call.out.const_data_ptr(),
                          ring, ring_next,
                          call.last_sample != nullptr ? call.last_sample->const_data_ptr() : nullptr},
                         call.noise, call.stochastic, call.generator, call.sample_offset);
  });
}

}  // namespace ddpm::cuda
