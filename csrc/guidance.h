// Classifier-free guidance of a model output, written once for the families that take it (the sampler steps,
// csrc/sampler_coefficients.h, and the flow step, csrc/flow.h) and for both backends:
//
//     g = u + w_b (c - u)                                   c conditional, u unconditional, w_b per sample
//     g <- g (phi std(c_b) / std(g_b) + 1 - phi)            guidance_rescale phi > 0 (Lin et al. 2023)
//
// with unbiased per-sample standard deviations over the guided elements (diffusers' rescale_noise_cfg). The
// guided output is formed in registers where the step reads its model output.
//
// The rescale is a reduction pass before the step: per piece of a sample it sums the shifted values c - K_c,
// (c - K_c)^2, g - K_g, (g - K_g)^2 (K: the sample's first element, so the sums do not cancel catastrophically
// when the mean is large against the spread), combined in float64; the step's per-sample coefficients turn
// them into the factor (rescale_factor). No host sync. The backends' reduction loops are
// cpu/guidance.h and cuda/guidance.cuh.
//
// Layout: element `off` of sample b's guided block is at cond[b * (N + extra) + off] (uncond likewise); the
// loops index it by i = b * N + off, so the pointers read cond + b * extra + i. extra = 0 except for a learned
// variance, whose variance channels (the N elements after the prediction's, read from the conditional output
// only) are not guided.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

#include <cmath>
#include <cstdint>

#include "family.h"

namespace ddpm {

// The four sums of the rescale reduction per piece of a sample, and the shifts they are taken around.
constexpr int kRescaleSums = 4;  // sum c', sum c'^2, sum g', sum g'^2

template <typename acc_t>
struct RescaleShift {
  acc_t c, g, w;  // K_c, K_g, and the sample's guidance scale
};

// The rescale factor of one sample from the sums of its `chunks` pieces (float64 throughout).
DDPM_HD double rescale_factor(const double* sums, int64_t chunks, int64_t N, double phi) {
  double s[kRescaleSums] = {0, 0, 0, 0};
  for (int64_t c = 0; c < chunks; ++c)
    for (int q = 0; q < kRescaleSums; ++q) s[q] += sums[c * kRescaleSums + q];
  const double n = static_cast<double>(N);
  double var_c = (s[1] - s[0] * s[0] / n) / (n - 1), var_g = (s[3] - s[2] * s[2] / n) / (n - 1);
  var_c = var_c < 0 ? 0 : var_c;  // rounding below 0 (NaN stays NaN: N = 1 gives NaN, as torch.std)
  var_g = var_g < 0 ? 0 : var_g;
#if defined(__CUDA_ARCH__)
  const double ratio = ::sqrt(var_c) / ::sqrt(var_g);
#else
  const double ratio = std::sqrt(var_c) / std::sqrt(var_g);
#endif
  return phi * ratio + (1 - phi);
}

// Sample b's guidance: its scale and its rescale factor (1 without rescale).
template <typename acc_t>
struct GuidanceCoef {
  acc_t w, factor;
};

// The operands of a guided model output. `sums` is set by the backend's reduction pass (nullptr: no rescale).
// Ptrs: how cond and uncond are read (csrc/family.h; csrc/mixed.h's MixedPtrs reads them in their own dtype).
template <typename scalar_t, typename Ptrs = SamePtrs<scalar_t>>
struct Guidance {
  using acc_t = at::opmath_type<scalar_t>;
  typename Ptrs::model_in cond;
  typename Ptrs::model_in uncond;  // null: unguided
  const acc_t* scale;      // w, (B,) in the compute dtype
  int64_t N, extra;        // guided elements per sample, and the elements after them (see the layout above)
  double phi;
  const double* sums;  // kRescaleSums per piece, `chunks` pieces per sample
  int64_t chunks;

  static Guidance make(const at::Tensor& cond, const at::Tensor* uncond, const at::Tensor* scale, int64_t N,
                       int64_t extra, double phi) {
    return {Ptrs::model_input(cond),
            uncond != nullptr ? Ptrs::model_input(*uncond) : typename Ptrs::model_in{},
            scale != nullptr ? scale->const_data_ptr<acc_t>() : nullptr,
            N,
            extra,
            phi,
            nullptr,
            0};
  }

  // Whether the step needs the reduction pass first.
  bool rescaled() const { return !(uncond == nullptr) && phi > 0; }

  DDPM_HD GuidanceCoef<acc_t> coef(int64_t b) const {
    if (uncond == nullptr) return {acc_t(0), acc_t(1)};
    return {scale[b], sums != nullptr ? static_cast<acc_t>(rescale_factor(sums + b * chunks * kRescaleSums, chunks,
                                                                          N, phi))
                                      : acc_t(1)};
  }

  // g * factor over one slice (elements [i, i + n), i = b * N + off): `v` holds the conditional lanes on entry.
  template <typename IO>
  DDPM_LANE void mix(int64_t b, int64_t i, int64_t n, const GuidanceCoef<acc_t>& c, typename IO::V* v) const {
    using V = typename IO::V;
    V uv[IO::kLanes];
    IO::load(uncond + b * extra + i, uv, n);
    DDPM_UNROLL
    for (int k = 0; k < IO::kLanes; ++k) v[k] = madd(splat<V>(c.w), v[k] - uv[k], uv[k]) * splat<V>(c.factor);
  }

  // The rescale reduction's shifts for sample b (its first guided element).
  DDPM_HD RescaleShift<acc_t> shift(int64_t b) const {
    const acc_t w = scale[b];
    const int64_t first = b * (N + extra);
    const acc_t c0 = static_cast<acc_t>(value_at(cond + first)), u0 = static_cast<acc_t>(value_at(uncond + first));
    return {c0, u0 + w * (c0 - u0), w};
  }

  // acc[q][k] += the q-th shifted sum over one slice (elements [i, i + n) of sample b), in IO::V lanes, which may
  // be wider than acc_t (float64 on CUDA). Lanes past a short slice add nothing.
  template <typename IO>
  DDPM_LANE void rescale_sums_of(int64_t b, int64_t i, int64_t n, const RescaleShift<acc_t>& sh,
                                 typename IO::V (*acc)[IO::kLanes]) const {
    using V = typename IO::V;
    using T = lane_scalar_t<V>;
    constexpr int W = LaneOps<V>::kWidth;
    V cv[IO::kLanes], uv[IO::kLanes];
    IO::load(cond + b * extra + i, cv, n);
    IO::load(uncond + b * extra + i, uv, n);
    DDPM_UNROLL
    for (int k = 0; k < IO::kLanes; ++k) {
      const V g = madd(splat<V>(T(sh.w)), cv[k] - uv[k], uv[k]);
      V dc = cv[k] - splat<V>(T(sh.c)), dg = g - splat<V>(T(sh.g));
      if (n < int64_t(IO::kLanes) * W) {  // a short slice: zero the lanes past n
        alignas(sizeof(T) * W) T mask[W];
        for (int j = 0; j < W; ++j) mask[j] = int64_t(k) * W + j < n ? T(1) : T(0);
        const V m = LaneOps<V>::loadu(mask);
        dc = dc * m;
        dg = dg * m;
      }
      acc[0][k] = acc[0][k] + dc;
      acc[1][k] = madd(dc, dc, acc[1][k]);
      acc[2][k] = acc[2][k] + dg;
      acc[3][k] = madd(dg, dg, acc[3][k]);
    }
  }
};

}  // namespace ddpm
