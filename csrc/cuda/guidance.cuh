// The CUDA pass of the guidance rescale (csrc/guidance.h), shared by the sampler steps and the flow step: one
// reduction launch before the step, per piece of a sample the four shifted sums in float64.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>

#include "launch.cuh"

#include "../guidance.h"

namespace ddpm::cuda {

constexpr int kRescaleItems = 16;  // elements per thread per piece: a piece is kThreads * kRescaleItems elements
constexpr int64_t kRescaleChunk = int64_t(kThreads) * kRescaleItems;

// One element per slice, in float64 lanes: the rescale sums accumulate in float64 on the device. A mixed call's
// operands (csrc/mixed.h) are read in their own dtype, through float32 as the others.
template <typename scalar_t>
struct DoubleIO {
  using V = double;
  static constexpr int kLanes = 1;
  static DDPM_LANE void load(const scalar_t* p, V* v, int64_t) {
    v[0] = static_cast<double>(static_cast<at::opmath_type<scalar_t>>(*p));
  }
  static DDPM_LANE void load(MixedPtr p, V* v, int64_t) { v[0] = static_cast<double>(mixed_load<1>(p).val[0]); }
};

// Piece p = b * chunks + c (kRescaleChunk elements of sample b) into sums[p * kRescaleSums + q]; blocks take
// pieces in grid-stride turns. Fixed pieces and tree sums: the result does not depend on scheduling or on the
// grid size.
template <typename scalar_t, typename Ptrs>
__global__ void __launch_bounds__(kThreads)
    rescale_sums_kernel(Guidance<scalar_t, Ptrs> g, int64_t chunks, int64_t pieces, double* sums) {
  __shared__ double shared[kThreads / 32];
  const int64_t N = g.N;
  for (int64_t p = blockIdx.x; p < pieces; p += gridDim.x) {
    const int64_t b = p / chunks, chunk = p - b * chunks;
    const auto sh = g.shift(b);
    const int64_t begin = b * N + chunk * kRescaleChunk;
    const int64_t end = begin + kRescaleChunk < (b + 1) * N ? begin + kRescaleChunk : (b + 1) * N;
    double acc[kRescaleSums][1] = {{0}, {0}, {0}, {0}};
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
      g.template rescale_sums_of<DoubleIO<scalar_t>>(b, i, 1, sh, acc);
    }
    DDPM_UNROLL
    for (int q = 0; q < kRescaleSums; ++q) {
      const double s = block_sum(acc[q][0], shared);
      if (threadIdx.x == 0) sums[p * kRescaleSums + q] = s;
    }
  }
}

// When `g` is rescaled: the reduction over its B samples on the current stream (the current device must be the
// data's), `g` pointed at the sums, and the tensor holding them returned (keep it until the step is launched:
// the caching allocator orders its reuse on the stream). Else an undefined tensor.
template <typename scalar_t, typename Ptrs>
at::Tensor prepare_rescale(Guidance<scalar_t, Ptrs>& g, int64_t B, const at::TensorOptions& options) {
  if (!g.rescaled() || B == 0 || g.N == 0) return at::Tensor();
  const int64_t chunks = (g.N + kRescaleChunk - 1) / kRescaleChunk, pieces = B * chunks;
  at::Tensor sums = at::empty({pieces * kRescaleSums}, options.dtype(at::kDouble));
  const int64_t blocks = std::min<int64_t>(pieces, int64_t(sm_count()) * 32);
  rescale_sums_kernel<scalar_t, Ptrs><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      g, chunks, pieces, sums.mutable_data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  g.sums = sums.const_data_ptr<double>();
  g.chunks = chunks;
  return sums;
}

}  // namespace ddpm::cuda
