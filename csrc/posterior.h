// The posterior family: q_posterior, p_mean_variance and p_sample, one reverse step per sample:
//   x0   = x0_xt * x_t + x0_mo * model_output   (eps / v; the x0 parameterization uses model_output as is)
//   x0   = clamp(x0, -1, 1) when clip_denoised
//   mean = coef1 * x0 + coef2 * x_t
//   out  = mean + sigma * z,  sigma = [t > 0] exp(0.5 log_var)   (p_sample)
// q_posterior is the mean with x_start as an unclipped x0 prediction.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include <optional>

#include "coefficients.h"

namespace ddpm {

template <typename acc_t>
struct Step {
  acc_t x0_xt, x0_mo, coef1, coef2, sigma;
};

template <typename acc_t, typename table_t>
DDPM_HD Step<acc_t> step_coefficients(Param param, const table_t* table, int64_t T, int64_t t) {
  Step<acc_t> s;
  if (param == Param::kEps) {
    s.x0_xt = gather<acc_t>(table, T, kSqrtRecipAlphasCumprod, t);
    s.x0_mo = -gather<acc_t>(table, T, kSqrtRecipm1AlphasCumprod, t);
  } else if (param == Param::kV) {
    s.x0_xt = gather<acc_t>(table, T, kSqrtAlphasCumprod, t);
    s.x0_mo = -gather<acc_t>(table, T, kSqrtOneMinusAlphasCumprod, t);
  } else {
    s.x0_xt = acc_t(0);
    s.x0_mo = acc_t(1);
  }
  s.coef1 = gather<acc_t>(table, T, kPosteriorMeanCoef1, t);
  s.coef2 = gather<acc_t>(table, T, kPosteriorMeanCoef2, t);
  // The seed's nonzero_mask: no noise at t == 0. Out-of-range t keeps the NaN. exp in float64, rounded once:
  // a per-sample cost.
  const double log_var = gather<double>(table, T, kPosteriorLogVarianceClipped, t);
  s.sigma = (t == 0) ? acc_t(0) : static_cast<acc_t>(LaneOps<double>::exp(0.5 * log_var));
  return s;
}

template <typename V, typename acc_t, typename ParamT, typename ClipT>
DDPM_LANE V posterior_mean(const Step<acc_t>& c, ParamT param, ClipT clip, const V& x, const V& mo) {
  V x0 = predict_x0(param, c.x0_xt, c.x0_mo, x, mo);
  if (clip) x0 = clamp_keep_nan(x0, splat<V>(acc_t(-1)), splat<V>(acc_t(1)));
  return madd(splat<V>(c.coef1), x0, splat<V>(c.coef2) * x);
}

// One call of the family, as csrc/host_ops.h hands it to a backend. `model_output` is x_start for
// q_posterior; var / log_var ((B,) in the table's dtype) are written when given; `sample` adds the noise term,
// with the given noise or, when noise is nullptr, normals drawn in the kernel from `generator`.
struct PosteriorCall {
  const at::Tensor &x_t, &t, &model_output, &table;
  Param param;
  bool clip;
  const at::Tensor& out;
  const at::Tensor *var, *log_var;
  bool sample;
  const at::Tensor* noise;
  std::optional<at::Generator> generator;
  int64_t sample_offset = 0;  // global index of the first sample in the noise stream
};

// ParamT / ClipT: Param / bool, or std::integral_constant of them (see family.h). scalar_t: the output's (the
// promoted dtype of a mixed call); Ptrs: how x_t and model_output are read (csrc/family.h).
template <typename scalar_t, typename ParamT, typename ClipT, typename Ptrs = SamePtrs<scalar_t>>
struct PosteriorKernel {
  using acc_t = at::opmath_type<scalar_t>;
  using Coef = Step<acc_t>;
  typename Ptrs::in x_t;
  typename Ptrs::in mo;
  scalar_t* out;
  acc_t* var;
  acc_t* log_var;
  Timesteps<acc_t> ts;
  ParamT param;
  ClipT clip;

  static PosteriorKernel make(const PosteriorCall& call, ParamT param, ClipT clip) {
    return {Ptrs::input(call.x_t),
            Ptrs::input(call.model_output),
            call.out.mutable_data_ptr<scalar_t>(),
            call.var != nullptr ? call.var->mutable_data_ptr<acc_t>() : nullptr,
            call.log_var != nullptr ? call.log_var->mutable_data_ptr<acc_t>() : nullptr,
            Timesteps<acc_t>::of(call.t, call.table),
            param,
            clip};
  }

  DDPM_HD Coef coef(int64_t b) const { return step_coefficients<acc_t>(param, ts.table, ts.T, ts.t[b]); }

  DDPM_HD void per_sample(int64_t b) const {
    if (var == nullptr) return;
    var[b] = ts.at(kPosteriorVariance, b);
    log_var[b] = ts.at(kPosteriorLogVarianceClipped, b);
  }

  template <typename IO, typename Z>
  DDPM_LANE void apply(int64_t, int64_t i, int64_t n, const Coef& c, Z& z) const {
    using V = typename IO::V;
    V xv[IO::kLanes], mv[IO::kLanes], zv[IO::kLanes];
    IO::load(x_t + i, xv, n);
    IO::load(mo + i, mv, n);
    if (z.present()) z.template get<IO>(i, n, zv);
    DDPM_UNROLL
    for (int k = 0; k < IO::kLanes; ++k) {
      const V mean = posterior_mean(c, param, clip, xv[k], mv[k]);
      xv[k] = z.present() ? madd(splat<V>(c.sigma), zv[k], mean) : mean;
    }
    IO::store(out + i, xv, n);
  }
};

}  // namespace ddpm
