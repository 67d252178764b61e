// The CPU pass of the guidance rescale (csrc/guidance.h), shared by the sampler steps and the flow step: per
// piece of a sample, the four shifted sums in float64.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "loops.h"

#include "../guidance.h"

namespace ddpm::cpu::CPU_CAPABILITY {

// Elements per reduction piece (a parallel work item), and per float64 flush of the lane accumulators inside
// it: the float32 lanes sum at most a few dozen terms each, so their rounding stays far below the float32
// result's; partial sums per (sample, piece) make the result independent of the thread count.
constexpr int64_t kRescaleChunk = 4096;
constexpr int64_t kRescaleFlush = 256;

// When `g` is rescaled: the reduction over its B samples into `storage`, and `g` pointed at the sums. Else
// nothing. Float32 sums (a float32 call's, and a mixed call's, which reads float32, float16 and bfloat16
// operands through MixedPtrs) run on MixedLanes' two-vector slices: a mixed call adds the all-float32 call's
// terms in the same order, so its factors are that call's exactly.
template <typename scalar_t, typename Ptrs>
void prepare_rescale(Guidance<scalar_t, Ptrs>& g, int64_t B, std::vector<double>& storage) {
  if (!g.rescaled() || B == 0 || g.N == 0) return;
  using L = std::conditional_t<std::is_same_v<scalar_t, float>, MixedLanes, Lanes<scalar_t>>;
  using V = typename L::V;
  const int64_t N = g.N, chunks = (N + kRescaleChunk - 1) / kRescaleChunk;
  storage.assign(B * chunks * kRescaleSums, 0.0);
  double* sums = storage.data();
  const Guidance<scalar_t, Ptrs>& f = g;
  at::parallel_for(0, B * chunks, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t b = p / chunks;
      const auto sh = f.shift(b);
      int64_t i = b * N + (p % chunks) * kRescaleChunk;
      const int64_t stop = std::min(i + kRescaleChunk, (b + 1) * N);
      double total[kRescaleSums] = {0, 0, 0, 0};
      while (i < stop) {
        const int64_t flush = std::min(i + kRescaleFlush, stop);
        V acc[kRescaleSums][L::kLanes];
        for (int q = 0; q < kRescaleSums; ++q)
          for (int k = 0; k < L::kLanes; ++k) acc[q][k] = splat<V>(0);
        for (; i < flush; i += L::size()) {
          f.template rescale_sums_of<L>(b, i, std::min<int64_t>(L::size(), flush - i), sh, acc);
        }
        for (int q = 0; q < kRescaleSums; ++q)
          for (int k = 0; k < L::kLanes; ++k) total[q] += hsum(acc[q][k]);
      }
      for (int q = 0; q < kRescaleSums; ++q) sums[p * kRescaleSums + q] = total[q];
    }
  });
  g.sums = sums;
  g.chunks = chunks;
}

}  // namespace ddpm::cpu::CPU_CAPABILITY
