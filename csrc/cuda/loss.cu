// CUDA kernels of the loss family (csrc/loss.h): a two-launch reduction for the forward, the family kernel
// for the backward.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>

#include "kernels.h"
#include "launch.cuh"

#include "../loss.h"

namespace ddpm::cuda {
namespace {


constexpr int kLossItems = 16;  // elements per thread per chunk: a chunk is kThreads * kLossItems elements
constexpr int64_t kLossChunk = int64_t(kThreads) * kLossItems;

// The loss is summed in pieces: piece p = b * chunks + c is chunk c (kLossChunk elements, the last one shorter)
// of sample b, and block k of the grid sums pieces k, k + gridDim.x, ... into partial[p], W elements per load
// (W > 1: packets, N a multiple of W). The batch is not a grid dimension (gridDim.y stops at 65535, and a
// batch may be larger). Fixed-size pieces and tree sums: the result does not depend on scheduling or on the
// grid size.
template <typename scalar_t, int W, typename F>
__global__ void loss_partials_kernel(F f, int64_t N, int64_t chunks, int64_t pieces,
                                     at::opmath_type<scalar_t>* partial) {
  using acc_t = at::opmath_type<scalar_t>;
  using IO = PacketIO<scalar_t, W>;
  __shared__ acc_t shared[kThreads / 32];
  // p is the same for every thread of the block, so all of them reach block_sum's barriers together.
  for (int64_t p = blockIdx.x; p < pieces; p += gridDim.x) {
    const int64_t b = p / chunks, chunk = p - b * chunks;
    const LossCoef<acc_t> c = f.loss_coef(b);
    const int64_t begin = b * N + chunk * kLossChunk;
    const int64_t end = begin + kLossChunk < (b + 1) * N ? begin + kLossChunk : (b + 1) * N;
    acc_t acc[W];
    DDPM_UNROLL
    for (int k = 0; k < W; ++k) acc[k] = acc_t(0);
    for (int64_t i = begin + int64_t(threadIdx.x) * W; i < end; i += int64_t(blockDim.x) * W) {
      f.template accumulate<IO>(i, W, c, acc);
    }
    acc_t s = acc[0];
    DDPM_UNROLL
    for (int k = 1; k < W; ++k) s += acc[k];
    s = block_sum(s, shared);
    if (threadIdx.x == 0) partial[p] = s;
  }
}

// One block: per-sample means, then (loss, loss_simple, loss_vlb) in model_output's dtype.
template <typename scalar_t, typename F>
__global__ void loss_finish_kernel(F f, const at::opmath_type<scalar_t>* partial, int64_t chunks, int64_t B,
                                   int64_t N, double w_simple, double w_elbo, scalar_t* loss, scalar_t* loss_simple,
                                   scalar_t* loss_vlb) {
  __shared__ double shared[kThreads / 32];
  LossTotals totals;
  for (int64_t b = threadIdx.x; b < B; b += blockDim.x) {
    double s = 0;
    for (int64_t c = 0; c < chunks; ++c) s += double(partial[b * chunks + c]);
    totals.add_sample(s, N, double(f.loss_coef(b).weight));
  }
  totals.simple = block_sum(totals.simple, shared);
  totals.vlb = block_sum(totals.vlb, shared);
  if (threadIdx.x == 0) totals.store(B, w_simple, w_elbo, loss, loss_simple, loss_vlb);
}

}  // namespace

void Kernels::diffusion_loss(const LossCall& call, const at::Tensor& loss, const at::Tensor& loss_simple,
                             const at::Tensor& loss_vlb) {
  const at::Tensor& mo = call.model_output;
  const int64_t B = mo.size(0), N = mo.numel() / B;
  const int64_t chunks = (N + kLossChunk - 1) / kLossChunk, pieces = B * chunks;
  c10::cuda::CUDAGuard guard(mo.device());  // first: sm_count() reads the current device
  // Enough blocks to fill the device a few times over; more pieces are taken in grid-stride turns.
  const int64_t blocks = std::min<int64_t>(pieces, int64_t(sm_count()) * 32);
  at::Tensor partial = at::empty({pieces}, call.table.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  // model_output, x_start and noise of different dtypes: float32, each read in its own (csrc/mixed.h), packets of
  // 4 elements where they allow, as the all-float32 call's: both sum the same terms in the same order
  const bool mixed = mixed_operands({&mo, &call.x_start, &call.noise});
  dispatch_operands(mo.scalar_type(), mixed, [&](auto S, auto Ps) {
    using scalar_t = typename decltype(S)::type;
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int kPacket = 16 / sizeof(scalar_t);
    const auto f = LossKernel<scalar_t, Param, bool, typename decltype(Ps)::type>::make(call, call.param, call.l1);
    acc_t* sums = partial.mutable_data_ptr<acc_t>();
    if (packets_fit(kPacket, N, {mo, call.x_start, call.noise})) {
      loss_partials_kernel<scalar_t, kPacket><<<blocks, kThreads, 0, stream>>>(f, N, chunks, pieces, sums);
    } else {
      loss_partials_kernel<scalar_t, 1><<<blocks, kThreads, 0, stream>>>(f, N, chunks, pieces, sums);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    loss_finish_kernel<scalar_t><<<1, kThreads, 0, stream>>>(
        f, sums, chunks, B, N, call.l_simple_weight, call.original_elbo_weight, loss.mutable_data_ptr<scalar_t>(),
        loss_simple.mutable_data_ptr<scalar_t>(), loss_vlb.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void Kernels::diffusion_loss_backward(const LossCall& call, const at::Tensor& grad_loss,
                                      const at::Tensor& grad_loss_simple, const at::Tensor& grad_loss_vlb,
                                      const at::Tensor& grad) {
  const at::Tensor& mo = call.model_output;
  c10::cuda::CUDAGuard guard(mo.device());
  // a mixed call reads each operand in its own dtype and writes the gradient in model_output's (csrc/mixed.h)
  const bool mixed = mixed_operands({&mo, &call.x_start, &call.noise});
  dispatch_operands(mo.scalar_type(), mixed, [&](auto S, auto Ps) {
    using scalar_t = typename decltype(S)::type;
    using F = LossKernel<scalar_t, Param, bool, typename decltype(Ps)::type>;
    run_family<scalar_t>(F::make_backward(call, call.param, call.l1, grad_loss, grad_loss_simple, grad_loss_vlb, grad),
                         mo.numel(), mo.numel() / mo.size(0), {mo, call.x_start, call.noise, grad});
  });
}

}  // namespace ddpm::cuda
