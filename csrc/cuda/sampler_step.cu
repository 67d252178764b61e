// CUDA kernel of the sampler-step family (csrc/sampler_coefficients.h): every sampler, one kernel template,
// one launch per step (two with a guidance rescale: its reduction first, cuda/guidance.cuh). The sampler,
// parameterization and guidance are runtime values (uniform branches), so a new sampler adds no instantiation
// here.
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
  DDPM_DISPATCH_FLOATING(call.x_t.scalar_type(), "ddpm_kernels_sampler_step_cuda", [&] {
    auto f = SamplerKernel<scalar_t, Sampler, Param, bool>::make(call, s.sampler, s.param, call.guided());
    const at::Tensor sums = prepare_rescale(f.guide, call.x_t.size(0), call.x_t.options());
    run_family<scalar_t>(f, numel, numel / call.x_t.size(0),
                         {call.x_t.const_data_ptr(), call.model_output.const_data_ptr(),
                          call.uncond != nullptr ? call.uncond->const_data_ptr() : nullptr, call.out.const_data_ptr(),
                          call.x0 != nullptr ? call.x0->const_data_ptr() : nullptr},
                         call.noise, s.add_noise, call.generator, call.sample_offset);
  });
}

}  // namespace ddpm::cuda
