// CUDA kernel of the sampler-step family (csrc/sampler_coefficients.h): every sampler, one kernel template,
// one launch per step (two with a guidance rescale: its reduction first, cuda/guidance.cuh). The sampler,
// parameterization and guidance are runtime values (uniform branches), so a new sampler adds no instantiation
// here: one per dtype, and one for a call whose operands have different dtypes.
#include <c10/cuda/CUDAGuard.h>

#include "guidance.cuh"
#include "kernels.h"
#include "launch.cuh"

namespace ddpm::cuda {

void Kernels::sampler_step(const SamplerCall& call) {
  const int64_t numel = call.x_t.numel();
  c10::cuda::CUDAGuard guard(call.x_t.device());  // first: sm_count() reads the current device
  if (numel == 0) {
    // a drawing call consumes the generator whatever the batch size, as on every backend
    if (call.step.add_noise && call.noise == nullptr) take_stream_state(call.generator);
    return;
  }
  const SamplerStep& s = call.step;
  // x_t, model_output (and uncond, of its dtype) and noise of different dtypes: float32, each read in its own
  // (csrc/mixed.h); out (the promoted dtype, which an unread noise of another dtype may also have set) too
  const bool mixed = mixed_operands({&call.x_t, &call.model_output, call.noise, &call.out});
  dispatch_operands(call.x_t.scalar_type(), mixed, [&](auto St, auto Ps) {
    using scalar_t = typename decltype(St)::type;
    using Ptrs = typename decltype(Ps)::type;
    auto f = SamplerKernel<scalar_t, Sampler, Param, bool, bool, Ptrs>::make(call, s.sampler, s.param, call.guided(),
                                                                             s.learned);
    const at::Tensor sums = prepare_rescale(f.guide, call.x_t.size(0), call.x_t.options());
    run_family<scalar_t, Ptrs>(f, numel, numel / call.x_t.size(0),
                               {&call.x_t, &call.model_output, call.uncond, &call.out, call.x0}, call.noise,
                               s.add_noise, call.generator, call.sample_offset);
  });
}

}  // namespace ddpm::cuda
