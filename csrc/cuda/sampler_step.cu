// CUDA kernel of the sampler-step family (csrc/sampler_coefficients.h): every sampler, one kernel template,
// one launch per step. The sampler and parameterization are runtime values (uniform branches), so a new
// sampler adds no instantiation here.
#include <c10/cuda/CUDAGuard.h>

#include "kernels.h"
#include "launch.cuh"

namespace ddpm::cuda {

void Kernels::sampler_step(const SamplerCall& call) {
  const int64_t numel = call.x_t.numel();
  c10::cuda::CUDAGuard guard(call.x_t.device());
  if (numel == 0) {
    // a drawing call consumes the generator whatever the batch size, as on every backend
    if (call.step.add_noise && call.noise == nullptr) take_stream_state(call.generator);
    return;
  }
  const SamplerStep& s = call.step;
  DDPM_DISPATCH_FLOATING(call.x_t.scalar_type(), "ddpm_kernels_sampler_step_cuda", [&] {
    run_family<scalar_t>(SamplerKernel<scalar_t, Sampler, Param>::make(call, s.sampler, s.param), numel,
                         numel / call.x_t.size(0),
                         {call.x_t.const_data_ptr(), call.model_output.const_data_ptr(), call.out.const_data_ptr(),
                          call.x0 != nullptr ? call.x0->const_data_ptr() : nullptr},
                         call.noise, s.add_noise, call.generator, call.sample_offset);
  });
}

}  // namespace ddpm::cuda
