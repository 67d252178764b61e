// The sampler-step family: ddim_step, ddpm_step and the samplers to come, on both backends.
//
// Every sampler step is, per element, an affine combination
//     out = c_x0 * x0 + c_eps * eps + c_x * x + sd * z
// of the sample x, the model output converted to an x0 prediction (clamped to +-clip_range when asked) and to
// an eps prediction, and the noise z (given, or drawn in the kernel), with per-sample coefficients. sd is a
// per-sample coefficient too, unless the model predicts its variance (ddpm_step's learned variance types,
// which read the variance channels of model_output). A guided step mixes the model output with an
// unconditional one in registers before the conversion (csrc/guidance.h; a rescaled one after the backend's
// reduction pass).
//
// A step goes t -> t_prev between arbitrary timesteps, so its coefficients are not rows of the schedule
// table: they are derived per sample from alphas_cumprod[t] and alphas_cumprod[t_prev]. The derivation runs
// in float64 from the float64 table (DiffusionSchedule.table(torch.float64)) with the formulas of
// ddpm_kernels/reference.py (ddim_step_ref / ddpm_step_ref), and each coefficient is rounded once to the
// compute dtype, as the reference does: the cancelling differences (1 - ab_t, 1 - ab_t / ab_prev near
// t = 0) never happen in float32. Only the elementwise math runs in float32 (float64 for float64 data); the
// CUDA kernel derives a sample's coefficients once per tile (csrc/cuda/launch.cuh), not per element, which
// matters on GPUs with slow float64.
//
// t outside [0, T), or t_prev outside [-1, T), gives NaN coefficients; nothing outside the table is read.
//
// Adding a sampler (no kernel code: the CPU loop and the CUDA kernel run every sampler through SamplerKernel):
//   1. a value of Sampler, before kNumSamplers;
//   2. its coefficient function, `foo_coefficients<acc_t>(table64, T, t, t_prev, const SamplerStep&)`,
//      returning SamplerCoef<acc_t>: conversion_coefficients(ab_t) plus the combination (c_x0, c_eps, c_x,
//      std), derived in float64 from step_alphas() and rounded once per coefficient;
//   3. its case in sampler_coefficients() and in sampler_terms(), which says whether the combination reads
//      eps and x (a term it does not read costs nothing, and a non-finite value is never multiplied by 0);
//   4. its options in SamplerStep, its schema in csrc/ops.cpp and its argument parsing in csrc/host_ops.h.
// Multistep samplers add their history buffers as pointers of SamplerKernel and their weights as
// coefficients of SamplerCoef, read and updated in the same pass.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <type_traits>

#include "coefficients.h"
#include "guidance.h"

namespace ddpm {

enum class Sampler : int { kDdim = 0, kDdpm = 1, kNumSamplers = 2 };

// variance_type of ddpm_step; the *_log variants give the same standard deviation (see the reference).
enum class Variance : int { kFixedSmall = 0, kFixedLarge = 1, kLearned = 2, kLearnedRange = 3 };

// The options of one step besides its tensors.
struct SamplerStep {
  Sampler sampler;
  Param param;
  Variance variance;  // ddpm_step; kFixedSmall (unused) for the others
  bool learned;       // a learned variance: model_output is (B, 2C, ...), variance channels second
  bool add_noise;     // false for ddim_step with eta == 0: no noise is read or drawn
  bool clip, set_alpha_to_one, use_clipped;
  double eta, clip_range;
};

template <typename acc_t>
struct SamplerCoef {
  acc_t sqrt_ab, sqrt_1m_ab;   // at t: eps from x0 / v, and x0 from v
  acc_t sqrt_recip_ab, sqrt_recipm1_ab;  // at t: x0 from eps, 1 / sqrt(ab) and sqrt(1 - ab) / sqrt(ab)
  acc_t x0_x, x0_mo;           // x0 = x0_x x + x0_mo model_output, for the parameterization
  acc_t c_x0, c_eps, c_x;      // the step's combination
  acc_t std;                   // noise scale of a fixed variance, [t > 0] included
  acc_t mask, min_log, max_log;  // learned variances: [t > 0], log(posterior variance), log(beta)
};

// (ab_t, ab_prev) in float64. t_prev == -1: ab_prev = 1 when set_alpha_to_one, else alphas_cumprod[0].
struct StepAlphas {
  double t, prev;
};

DDPM_HD StepAlphas step_alphas(const double* table64, int64_t T, int64_t t, int64_t t_prev, bool set_alpha_to_one) {
  const double* ac = table64 + int64_t(kAlphasCumprod) * T;
  const double ab_t = (t >= 0 && t < T) ? ac[t] : static_cast<double>(NAN);
  if (t_prev == -1) return {ab_t, set_alpha_to_one ? 1.0 : ac[0]};
  return {ab_t, (t_prev >= 0 && t_prev < T) ? ac[t_prev] : static_cast<double>(NAN)};
}

// max(v, lo) that keeps NaN, as torch.clamp.
DDPM_HD double clamp_min_nan(double v, double lo) { return v < lo ? lo : v; }

// The model output's conversions at t; every other coefficient starts at 0.
template <typename acc_t>
DDPM_HD SamplerCoef<acc_t> conversion_coefficients(double ab_t) {
  const double sqrt_ab = sqrt(ab_t), sqrt_1m_ab = sqrt(1.0 - ab_t);
  SamplerCoef<acc_t> c{};
  c.sqrt_ab = static_cast<acc_t>(sqrt_ab);
  c.sqrt_1m_ab = static_cast<acc_t>(sqrt_1m_ab);
  c.sqrt_recip_ab = static_cast<acc_t>(1.0 / sqrt_ab);
  c.sqrt_recipm1_ab = static_cast<acc_t>(sqrt_1m_ab / sqrt_ab);
  return c;
}

template <typename acc_t>
DDPM_HD SamplerCoef<acc_t> ddim_coefficients(const double* table64, int64_t T, int64_t t, int64_t t_prev,
                                             const SamplerStep& s) {
  const StepAlphas ab = step_alphas(table64, T, t, t_prev, s.set_alpha_to_one);
  const double sigma = s.eta * sqrt((1.0 - ab.prev) / (1.0 - ab.t) * (1.0 - ab.t / ab.prev));
  SamplerCoef<acc_t> c = conversion_coefficients<acc_t>(ab.t);
  c.c_x0 = static_cast<acc_t>(sqrt(ab.prev));
  // 1 - ab_prev - sigma^2 >= 0 for eta <= 1; clamped so eta > 1 degrades to no direction term, not NaN
  c.c_eps = static_cast<acc_t>(sqrt(clamp_min_nan(1.0 - ab.prev - sigma * sigma, 0.0)));
  c.std = static_cast<acc_t>(sigma);
  return c;
}

template <typename acc_t>
DDPM_HD SamplerCoef<acc_t> ddpm_coefficients(const double* table64, int64_t T, int64_t t, int64_t t_prev,
                                             const SamplerStep& s) {
  const StepAlphas ab = step_alphas(table64, T, t, t_prev, true);
  const double alpha = ab.t / ab.prev, beta = 1.0 - alpha;
  // diffusers clamps before taking any log; CompVis' posterior_log_variance_clipped is the same clamp
  const double var = clamp_min_nan((1.0 - ab.prev) / (1.0 - ab.t) * beta, 1e-20);
  SamplerCoef<acc_t> c = conversion_coefficients<acc_t>(ab.t);
  c.c_x0 = static_cast<acc_t>(sqrt(ab.prev) * beta / (1.0 - ab.t));
  c.c_x = static_cast<acc_t>(sqrt(alpha) * (1.0 - ab.prev) / (1.0 - ab.t));
  c.mask = t > 0 ? acc_t(1) : acc_t(0);
  // the rounded factors multiplied in acc_t, as the reference
  c.std = c.mask * static_cast<acc_t>(s.variance == Variance::kFixedLarge ? sqrt(beta) : sqrt(var));
  c.min_log = static_cast<acc_t>(log(var));
  c.max_log = static_cast<acc_t>(log(beta));
  return c;
}

// Which of eps and x a sampler's combination reads (x0 it always reads).
struct SamplerTerms {
  bool eps, x;
};

constexpr DDPM_HD SamplerTerms sampler_terms(Sampler sampler) {
  switch (sampler) {
    case Sampler::kDdim: return {true, false};
    case Sampler::kDdpm: return {false, true};
    default: return {true, true};
  }
}

// SamplerT / ParamT: Sampler / Param, or std::integral_constant of them (see csrc/family.h).
template <typename acc_t, typename SamplerT, typename ParamT>
DDPM_HD SamplerCoef<acc_t> sampler_coefficients(SamplerT sampler, ParamT param, const SamplerStep& s,
                                                const double* table64, int64_t T, int64_t t, int64_t t_prev) {
  SamplerCoef<acc_t> c;
  switch (static_cast<Sampler>(sampler)) {
    case Sampler::kDdim: c = ddim_coefficients<acc_t>(table64, T, t, t_prev, s); break;
    case Sampler::kDdpm:
    default: c = ddpm_coefficients<acc_t>(table64, T, t, t_prev, s); break;
  }
  c.x0_x = param == Param::kEps ? c.sqrt_recip_ab : c.sqrt_ab;
  c.x0_mo = param == Param::kEps ? -c.sqrt_recipm1_ab : -c.sqrt_1m_ab;
  return c;
}

// f(std::integral_constant<Sampler, S>()) for the runtime sampler: one instantiation per sampler.
template <int I = 0, typename F>
void with_sampler(Sampler sampler, const F& f) {
  if constexpr (I < static_cast<int>(Sampler::kNumSamplers)) {
    if (static_cast<int>(sampler) == I) return f(std::integral_constant<Sampler, static_cast<Sampler>(I)>());
    with_sampler<I + 1>(sampler, f);
  }
}

// One call of the family, as csrc/host_ops.h hands it to a backend: noise is nullptr unless given and
// step.add_noise (in-kernel noise from `generator` when step.add_noise and no noise is given); x0 nullptr
// unless the x0 prediction is returned. Guided (uncond and guidance non-null): the model output is
// u + w (c - u) of model_output (c) and uncond (u, in model_output's shape and layout) by the per-sample scales
// `guidance`, rescaled when guidance_rescale > 0 (csrc/guidance.h); a learned variance's channels come from
// model_output.
struct SamplerCall {
  SamplerStep step;
  const at::Tensor &x_t, &t, &t_prev, &model_output;
  const at::Tensor* uncond;
  const at::Tensor* guidance;
  double guidance_rescale;
  const at::Tensor& table64;
  const at::Tensor* noise;
  std::optional<at::Generator> generator;
  const at::Tensor* x0;
  const at::Tensor& out;
  int64_t sample_offset = 0;  // global index of the first sample in the noise stream

  bool guided() const { return uncond != nullptr; }
};

// SamplerT / ParamT: Sampler / Param, GuidedT / LearnedT: bool, or std::integral_constant of them (see
// csrc/family.h); LearnedT is `step.learned` (the variance channels read, an exp per element): a constant false
// compiles neither, so the CPU loop of a fixed-variance step holds no call that clobbers its vector registers.
// scalar_t: the outputs' dtype (the promoted one of a mixed call); Ptrs: how x_t, model_output and uncond are
// read (csrc/family.h; the model outputs through model_in, so the CPU's typed autocast policy takes the step).
// `mo` is model_output: sample b's prediction at b * (N + mo_extra), its variance channels N later (mo_extra = N
// with a learned variance, else 0); guided, the prediction is mixed with uncond's (same layout) first.
template <typename scalar_t, typename SamplerT, typename ParamT, typename GuidedT, typename LearnedT,
          typename Ptrs = SamePtrs<scalar_t>>
struct SamplerKernel : NoPerSampleOutputs {
  using acc_t = at::opmath_type<scalar_t>;
  struct Coef : SamplerCoef<acc_t> {
    GuidanceCoef<acc_t> guide;
  };
  typename Ptrs::in x_t;
  typename Ptrs::model_in mo;
  scalar_t* out;
  scalar_t* x0;  // nullptr unless return_pred_x0
  Timesteps<double> ts;
  const int64_t* t_prev;
  int64_t N, mo_extra;
  acc_t clip_range;
  SamplerStep step;
  Guidance<scalar_t, Ptrs> guide;  // its rescale sums set by the backend's pass (csrc/guidance.h)
  SamplerT sampler;
  ParamT param;
  GuidedT guided;
  LearnedT learned;

  static SamplerKernel make(const SamplerCall& call, SamplerT sampler, ParamT param, GuidedT guided,
                            LearnedT learned) {
    const int64_t N = call.x_t.numel() == 0 ? 0 : call.x_t.numel() / call.x_t.size(0);
    const int64_t extra = call.step.learned ? N : 0;
    return {{},
            Ptrs::input(call.x_t),
            Ptrs::model_input(call.model_output),
            call.out.mutable_data_ptr<scalar_t>(),
            call.x0 != nullptr ? call.x0->mutable_data_ptr<scalar_t>() : nullptr,
            Timesteps<double>::of(call.t, call.table64),
            call.t_prev.const_data_ptr<int64_t>(),
            N,
            extra,
            static_cast<acc_t>(call.step.clip_range),
            call.step,
            Guidance<scalar_t, Ptrs>::make(call.model_output, call.uncond, call.guidance, N, extra,
                                           call.guidance_rescale),
            sampler,
            param,
            guided,
            learned};
  }

  DDPM_HD Coef coef(int64_t b) const {
    Coef c;
    static_cast<SamplerCoef<acc_t>&>(c) =
        sampler_coefficients<acc_t>(sampler, param, step, ts.table, ts.T, ts.t[b], t_prev[b]);
    c.guide = guided ? guide.coef(b) : GuidanceCoef<acc_t>{acc_t(0), acc_t(1)};
    return c;
  }

  // One element: x the sample, mo the model output, v its variance channel (learned variances), z the noise
  // when `noisy`; writes the (clipped) x0 prediction to x0.
  template <typename V>
  DDPM_LANE V element(const Coef& c, const V& x, const V& mo, const V& v, const V& z, bool noisy, V& x0) const {
    const SamplerTerms terms = sampler_terms(sampler);
    x0 = predict_x0(param, c.x0_x, c.x0_mo, x, mo);
    if (step.clip) x0 = clamp_keep_nan(x0, splat<V>(-clip_range), splat<V>(clip_range));
    V r = splat<V>(c.c_x0) * x0;
    if (terms.eps) {
      V eps;
      if (step.use_clipped || param == Param::kX0) {
        eps = (x - splat<V>(c.sqrt_ab) * (step.use_clipped ? x0 : mo)) / splat<V>(c.sqrt_1m_ab);
      } else if (param == Param::kEps) {
        eps = mo;
      } else {
        eps = madd(splat<V>(c.sqrt_ab), mo, splat<V>(c.sqrt_1m_ab) * x);
      }
      r = madd(splat<V>(c.c_eps), eps, r);
    }
    if (terms.x) r = madd(splat<V>(c.c_x), x, r);
    if (!noisy) return r;
    V sd;
    if (learned && step.variance == Variance::kLearned) {
      sd = splat<V>(c.mask) * lane_exp(splat<V>(acc_t(0.5)) * v);
    } else if (learned && step.variance == Variance::kLearnedRange) {
      const V one = splat<V>(acc_t(1)), half = splat<V>(acc_t(0.5));
      const V frac = (v + one) * half;
      sd = splat<V>(c.mask) * lane_exp(half * madd(frac, splat<V>(c.max_log), (one - frac) * splat<V>(c.min_log)));
    } else {
      sd = splat<V>(c.std);
    }
    return madd(sd, z, r);
  }

  template <typename IO, typename Z>
  DDPM_LANE void apply(int64_t b, int64_t i, int64_t n, const Coef& c, Z& z) const {
    using V = typename IO::V;
    const auto mo_b = mo + b * mo_extra;
    V xv[IO::kLanes], mv[IO::kLanes], vv[IO::kLanes], zv[IO::kLanes], x0v[IO::kLanes];
    IO::load(x_t + i, xv, n);
    IO::load(mo_b + i, mv, n);
    if (guided) guide.template mix<IO>(b, i, n, c.guide, mv);
    if (learned) IO::load(mo_b + i + N, vv, n);
    if (z.present()) z.template get<IO>(i, n, zv);
    DDPM_UNROLL
    for (int k = 0; k < IO::kLanes; ++k) xv[k] = element(c, xv[k], mv[k], vv[k], zv[k], z.present(), x0v[k]);
    IO::store(out + i, xv, n);
    if (x0 != nullptr) IO::store(x0 + i, x0v, n);
  }
};

}  // namespace ddpm
