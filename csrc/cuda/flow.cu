// CUDA kernels of the flow-matching family (csrc/flow.h): the interpolant, the step (the flow step and the
// Euler steps on a sigma table) and the loss backward are the family kernel (launch.cuh); the guidance rescale
// is one reduction launch before the step (cuda/guidance.cuh), the loss a two-launch reduction. Flags are
// runtime values (uniform branches): one instantiation per dtype, and one for a call whose operands have
// different dtypes (float32, each operand read in its own: csrc/mixed.h; its outputs float32, the loss gradient
// in model_output's dtype).
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>

#include "guidance.cuh"
#include "kernels.h"
#include "launch.cuh"

#include "../flow.h"

namespace ddpm::cuda {
namespace {

constexpr int kFlowItems = 16;  // elements per thread per piece: a piece is kThreads * kFlowItems elements
constexpr int64_t kFlowChunk = int64_t(kThreads) * kFlowItems;

// The loss's sums of l(d) per piece, as the rescale sums (cuda/guidance.cuh); W elements per load (W > 1:
// packets).
template <typename scalar_t, int W, typename F>
__global__ void __launch_bounds__(kThreads)
    flow_loss_partials_kernel(F f, int64_t N, int64_t chunks, int64_t pieces, double* partial) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ double shared[kThreads / 32];
  for (int64_t p = blockIdx.x; p < pieces; p += gridDim.x) {
    const int64_t b = p / chunks, chunk = p - b * chunks;
    const int64_t begin = b * N + chunk * kFlowChunk;
    const int64_t end = begin + kFlowChunk < (b + 1) * N ? begin + kFlowChunk : (b + 1) * N;
    acc_t acc[W];
    DDPM_UNROLL
    for (int k = 0; k < W; ++k) acc[k] = acc_t(0);
    for (int64_t i = begin + int64_t(threadIdx.x) * W; i < end; i += int64_t(blockDim.x) * W) {
      f.template accumulate<PacketIO<scalar_t, W>>(b, i, W, acc);
    }
    double s = 0;
    DDPM_UNROLL
    for (int k = 0; k < W; ++k) s += static_cast<double>(acc[k]);
    s = block_sum(s, shared);
    if (threadIdx.x == 0) partial[p] = s;
  }
}

// One block: the per-sample means, weighted, then their mean, in the compute dtype.
template <typename scalar_t, typename F>
__global__ void __launch_bounds__(kThreads)
    flow_loss_finish_kernel(F f, const double* partial, int64_t chunks, int64_t B, int64_t N,
                            at::opmath_type<scalar_t>* loss) {
  __shared__ double shared[kThreads / 32];
  double total = 0;
  for (int64_t b = threadIdx.x; b < B; b += blockDim.x) {
    double s = 0;
    for (int64_t c = 0; c < chunks; ++c) s += partial[b * chunks + c];
    total += static_cast<double>(f.sample_weight(b)) * (s / static_cast<double>(N));
  }
  total = block_sum(total, shared);
  if (threadIdx.x == 0) *loss = static_cast<at::opmath_type<scalar_t>>(total / static_cast<double>(B));
}

}  // namespace

void Kernels::flow_interpolate(const FlowInterpolateCall& call) {
  c10::cuda::CUDAGuard guard(call.x.device());
  const int64_t numel = call.x.numel();
  dispatch_operands(call.x.scalar_type(), mixed_operands({&call.x, call.y, &call.out}), [&](auto S, auto Ps) {
    using scalar_t = typename decltype(S)::type;
    using F = FlowInterpolateKernel<scalar_t, bool, typename decltype(Ps)::type>;
    run_family<scalar_t>(F::make(call, call.period > 1), numel, numel / call.x.size(0),
                         {&call.x, call.y, &call.out, call.out2});
  });
}

// Every sampler of the step kernel (csrc/flow.h), one instantiation per dtype.
void Kernels::flow_step(const FlowStepCall& call) {
  const int64_t numel = call.sample.numel();
  c10::cuda::CUDAGuard guard(call.sample.device());  // first: sm_count() reads the current device
  const bool draw = call.adds_noise();
  if (numel == 0) {
    // a drawing call consumes the generator whatever the batch size, as on every backend
    if (draw && call.noise == nullptr) take_stream_state(call.generator);
    return;
  }
  const int64_t B = call.sample.size(0), N = numel / B;
  const bool mixed = mixed_operands({&call.sample, &call.model_output, call.uncond, call.noise, &call.out});
  dispatch_operands(call.sample.scalar_type(), mixed, [&](auto S, auto Ps) {
    using scalar_t = typename decltype(S)::type;
    using Ptrs = typename decltype(Ps)::type;
    auto f = FlowStepKernel<scalar_t, StepSampler, Param, bool, bool, Ptrs>::make(
        call, call.sampler, call.euler.param, call.guided(), call.per_token());
    const at::Tensor sums = prepare_rescale(f.guide, B, call.sample.options());
    run_family<scalar_t, Ptrs>(f, numel, N, {&call.sample, &call.model_output, call.uncond, &call.out, call.x0},
                               call.noise, draw, call.generator, call.sample_offset);
  });
}

void Kernels::flow_loss(const FlowLossCall& call, const at::Tensor& loss) {
  const at::Tensor& mo = call.model_output;
  const int64_t B = mo.size(0), N = mo.numel() / B;
  const int64_t chunks = (N + kFlowChunk - 1) / kFlowChunk, pieces = B * chunks;
  c10::cuda::CUDAGuard guard(mo.device());
  const int64_t blocks = std::min<int64_t>(pieces, int64_t(sm_count()) * 32);
  at::Tensor partial = at::empty({pieces}, mo.options().dtype(at::kDouble));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  // a mixed call takes packets of 4 elements where its operands allow, as the all-float32 call: both sum the same
  // terms in the same order
  dispatch_operands(mo.scalar_type(), call.mixed(), [&](auto S, auto Ps) {
    using scalar_t = typename decltype(S)::type;
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int kPacket = 16 / sizeof(scalar_t);
    const auto f = FlowLossKernel<scalar_t, bool, bool, typename decltype(Ps)::type>::make(call, call.l1,
                                                                                          call.period > 1);
    double* sums = partial.mutable_data_ptr<double>();
    if (packets_fit(kPacket, N, {mo, call.x0, call.noise})) {
      flow_loss_partials_kernel<scalar_t, kPacket><<<blocks, kThreads, 0, stream>>>(f, N, chunks, pieces, sums);
    } else {
      flow_loss_partials_kernel<scalar_t, 1><<<blocks, kThreads, 0, stream>>>(f, N, chunks, pieces, sums);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    flow_loss_finish_kernel<scalar_t><<<1, kThreads, 0, stream>>>(f, sums, chunks, B, N,
                                                                  loss.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void Kernels::flow_loss_backward(const FlowLossCall& call, const at::Tensor& grad_loss, const at::Tensor& grad) {
  const at::Tensor& mo = call.model_output;
  c10::cuda::CUDAGuard guard(mo.device());
  dispatch_operands(mo.scalar_type(), call.mixed(), [&](auto S, auto Ps) {
    using scalar_t = typename decltype(S)::type;
    using F = FlowLossKernel<scalar_t, bool, bool, typename decltype(Ps)::type>;
    run_family<scalar_t>(F::make_backward(call, call.l1, call.period > 1, grad_loss, grad), mo.numel(),
                         mo.numel() / mo.size(0), {mo, call.x0, call.noise, grad});
  });
}

}  // namespace ddpm::cuda
