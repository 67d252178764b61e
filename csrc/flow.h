// The flow-matching family (rectified flow: x_sigma = (1 - sigma) x0 + sigma eps, the model predicts
// v = eps - x0), written once for the CPU and CUDA backends (csrc/family.h):
//
//   flow_interpolate     out = (1 - s) x0 + s noise;  backward (g_x0, g_noise) = ((1 - s) g, s g)
//   flow_step            v = c, or guided v = (u + w_b (c - u)) factor_b;
//                        deterministic x' = x + (s_next - s) v,
//                        stochastic    x' = (1 - s_next) (x - s v) + s_next z
//   flow_loss            mean_b mean_i weight(s_i) l(d_i),  d = mo - (noise - x0),  l = d^2 or |d|;
//                        backward g weight(s_i) dl(d_i) / (B N),  dl = 2 d or sign(d)
//
// The step kernel also runs the Euler steps on a Karras sigma table (euler_step, euler_ancestral_step): one
// kernel body, a sampler flag and a per-sampler coefficient function (see "step" below).
//
// A sigma is read per sample or per token (ddpm_kernels._spec.SigmaOperand): element offset `off` of sample
// b's dense block reads flat[b * period + (off / repeat) % period]; period = 1 is one sigma per sample, which
// the kernels gather once per sample (Coef), else they read it per element through a TokenCursor. The
// step's sigmas may instead come from the scheduler's table by a per-sample step index: s = sigmas[i],
// s_next = sigmas[i + 1], NaN for an index outside [0, len - 1) (never a read outside the table).
//
// Guidance and its rescale (factor_b = phi std(c_b) / std(g_b) + 1 - phi, a reduction pass before the step) are
// csrc/guidance.h's, shared with the sampler steps.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <type_traits>

#include "coefficients.h"
#include "family.h"
#include "guidance.h"

namespace ddpm {

enum class FlowWeighting : int { kNone = 0, kSigmaSqrt = 1, kCosmap = 2 };

// SD3's loss weighting of one sigma (diffusers' compute_loss_weighting_for_sd3).
template <typename acc_t>
DDPM_HD acc_t flow_loss_weight(FlowWeighting weighting, acc_t s) {
  if (weighting == FlowWeighting::kSigmaSqrt) return acc_t(1) / (s * s);
  if (weighting == FlowWeighting::kCosmap) {
    return acc_t(2) / (acc_t(3.14159265358979323846) * (acc_t(1) - acc_t(2) * s + acc_t(2) * s * s));
  }
  return acc_t(1);
}

// A sigma operand as the kernels read it.
template <typename acc_t>
struct FlowSigma {
  const acc_t* flat;
  int64_t period, repeat;
  DDPM_HD bool per_token() const { return period > 1; }
};

// The walk of one sigma operand along consecutive elements of a sample: index() is (off / repeat) % period
// for the current offset, advanced without a division per element.
struct TokenCursor {
  int64_t p, r, period, repeat;
  DDPM_HD TokenCursor(int64_t off, int64_t period_, int64_t repeat_)
      : p((off / repeat_) % period_), r(off % repeat_), period(period_), repeat(repeat_) {}
  DDPM_HD void next() {
    if (++r == repeat) {
      r = 0;
      if (++p == period) p = 0;
    }
  }
};

// The lanes of one slice (n elements of a sample whose sigma row is `row`, from the element `cur` is at) of a
// per-token sigma, each value passed through `tf`; lanes past n hold `pad`; `cur` is left past the slice. A slice
// inside one run of `repeat` equal values is one broadcast.
template <typename IO, typename acc_t, typename TF>
DDPM_LANE void sigma_lanes_at(const acc_t* row, TokenCursor& cur, int64_t n, typename IO::V* out,
                              lane_scalar_t<typename IO::V> pad, const TF& tf) {
  using V = typename IO::V;
  using T = lane_scalar_t<V>;
  constexpr int W = LaneOps<V>::kWidth;
  constexpr int64_t kFull = int64_t(IO::kLanes) * W;
  if (n == kFull && cur.r + kFull <= cur.repeat) {
    const V v = splat<V>(static_cast<T>(tf(row[cur.p])));
    DDPM_UNROLL
    for (int k = 0; k < IO::kLanes; ++k) out[k] = v;
    cur.r += kFull - 1;
    cur.next();
    return;
  }
  DDPM_UNROLL
  for (int k = 0; k < IO::kLanes; ++k) {
    alignas(sizeof(T) * W) T buf[W];
    for (int j = 0; j < W; ++j) {
      const int64_t e = int64_t(k) * W + j;
      if (e < n) {
        buf[j] = static_cast<T>(tf(row[cur.p]));
        cur.next();
      } else {
        buf[j] = pad;
      }
    }
    out[k] = LaneOps<V>::loadu(buf);
  }
}

// The same for the slice at offset `off` of sample b.
template <typename IO, typename acc_t, typename TF>
DDPM_LANE void sigma_lanes(const FlowSigma<acc_t>& s, int64_t b, int64_t off, int64_t n, typename IO::V* out,
                           lane_scalar_t<typename IO::V> pad, const TF& tf) {
  TokenCursor cur(off, s.period, s.repeat);
  sigma_lanes_at<IO>(s.flat + b * s.period, cur, n, out, pad, tf);
}

struct Identity {
  template <typename T>
  DDPM_HD T operator()(T x) const {
    return x;
  }
};

template <typename acc_t>
struct WeightOf {
  FlowWeighting weighting;
  DDPM_HD acc_t operator()(acc_t s) const { return flow_loss_weight(weighting, s); }
};

// ------------------------------------------------------------------------------------------ interpolate
// out = (1 - s) x + s y, or with y == nullptr the transpose (out, out2) = ((1 - s) x, s x) for the incoming
// gradient x.
struct FlowInterpolateCall {
  const at::Tensor& x;
  const at::Tensor* y;
  const at::Tensor& sigma;
  int64_t period, repeat;
  const at::Tensor& out;
  const at::Tensor* out2;
};

// TokenT: bool, or std::integral_constant<bool, ...> (csrc/family.h): the sigma is read per token. Ptrs: how
// x and y are read (csrc/family.h; csrc/mixed.h's MixedPtrs reads each in its own dtype, scalar_t then float).
template <typename scalar_t, typename TokenT, typename Ptrs = SamePtrs<scalar_t>>
struct FlowInterpolateKernel : NoPerSampleOutputs {
  using acc_t = at::opmath_type<scalar_t>;
  struct Coef {
    acc_t a, s;  // 1 - sigma, sigma (per-sample sigma)
  };
  typename Ptrs::in x;
  typename Ptrs::in y;  // null: the transpose
  scalar_t* out;
  scalar_t* out2;
  FlowSigma<acc_t> sigma;
  int64_t N;
  TokenT per_token;

  static FlowInterpolateKernel make(const FlowInterpolateCall& call, TokenT per_token) {
    return {{},
            Ptrs::input(call.x),
            call.y != nullptr ? Ptrs::input(*call.y) : typename Ptrs::in{},
            call.out.mutable_data_ptr<scalar_t>(),
            call.out2 != nullptr ? call.out2->mutable_data_ptr<scalar_t>() : nullptr,
            {call.sigma.const_data_ptr<acc_t>(), call.period, call.repeat},
            call.x.numel() / call.x.size(0),
            per_token};
  }

  DDPM_HD Coef coef(int64_t b) const {
    if (per_token) return {acc_t(0), acc_t(0)};
    const acc_t s = sigma.flat[b];
    return {acc_t(1) - s, s};
  }

  template <typename IO, typename Z>
  DDPM_LANE void apply(int64_t b, int64_t i, int64_t n, const Coef& c, Z&) const {
    using V = typename IO::V;
    V av[IO::kLanes], sv[IO::kLanes], xv[IO::kLanes], r[IO::kLanes];
    if (per_token) {
      sigma_lanes<IO>(sigma, b, i - b * N, n, sv, lane_scalar_t<V>(0), Identity());
      DDPM_UNROLL
      for (int k = 0; k < IO::kLanes; ++k) av[k] = splat<V>(acc_t(1)) - sv[k];
    } else {
      DDPM_UNROLL
      for (int k = 0; k < IO::kLanes; ++k) {
        av[k] = splat<V>(c.a);
        sv[k] = splat<V>(c.s);
      }
    }
    IO::load(x + i, xv, n);
    if (y == nullptr) {
      DDPM_UNROLL
      for (int k = 0; k < IO::kLanes; ++k) r[k] = sv[k] * xv[k];
      IO::store(out2 + i, r, n);
      DDPM_UNROLL
      for (int k = 0; k < IO::kLanes; ++k) r[k] = av[k] * xv[k];
    } else {
      IO::load(y + i, r, n);
      DDPM_UNROLL
      for (int k = 0; k < IO::kLanes; ++k) r[k] = madd(av[k], xv[k], sv[k] * r[k]);
    }
    IO::store(out + i, r, n);
  }
};

// ------------------------------------------------------------------------------------------------- step
// The step kernel's samplers (ddpm_kernels/triton/flow.py's SAMPLER): the flow-matching Euler step,
// deterministic or re-noised, and the Euler steps on a Karras sigma table (x = x0 + sigma eps; euler_step and
// euler_ancestral_step, docs/design.md "Euler steps"). Each is, per element, an affine combination of the
// sample, the (guided) model output v and the noise z with per-sample coefficients (step_coefficients):
//
//   flow             x' = x + (s' - s) v
//   flow_stochastic  x' = (1 - s') (x - s v) + s' z
//   euler            x <- x + s_noise c_churn z (with churn); x0 and d = (x - x0) / s_hat from v (eps, x0, or v
//                    at s); x' = x + (s' - s_hat) d
//   euler_ancestral  x0 and d at s_hat = s; x' = x + (s_down - s) d + s_up z
//
// The flow samplers also read their sigmas per token; the Euler samplers gather theirs from the table.
enum class StepSampler : int { kFlow = 0, kFlowStochastic = 1, kEuler = 2, kEulerAncestral = 3 };

// The Euler samplers' options as the schema passes them (float64). churn is the gamma of a sample inside the
// window, min(s_churn / (len(sigmas) - 1), sqrt(2) - 1); 0 means no churn and no noise.
struct EulerOptions {
  Param param = Param::kEps;
  double churn = 0, s_tmin = 0, s_tmax = INFINITY, s_noise = 1;
};

template <typename T>
DDPM_HD T step_sqrt(T x) {
#if defined(__CUDA_ARCH__)
  return ::sqrt(x);
#else
  return std::sqrt(x);
#endif
}

// a * b rounded on its own, never contracted with a following sum into a fused multiply-add: __fmul_rn /
// __dmul_rn on CUDA (nvcc contracts by default); the CPU builds compile the step without contraction
// (cpu/flow.cpp).
template <typename V>
DDPM_LANE V mul_rn(const V& a, const V& b) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<V, double>) {
    return __dmul_rn(a, b);
  } else {
    return __fmul_rn(a, b);
  }
#else
  return a * b;
#endif
}

// One sample's step coefficients, in the compute dtype.
template <typename acc_t>
struct StepCoef {
  acc_t s, s_next;  // the sample's sigmas (placeholders for a flow step that reads them per token)
  acc_t s_hat, c_churn, c_derivative, c_noise;
  acc_t c_out, c_skip;  // v prediction at s: x0 = v c_out + x / c_skip
};

// The coefficients of sampler `sampler` from (s, s_next), in the reference's order of operations
// (ddpm_kernels/reference.py, flow_step_ref and euler_step_ref). The churn window compares s with the bounds in
// the compute dtype: exactly for float64 data, against the bounds rounded to float32 otherwise, as torch
// compares a float32 tensor with a Python float. A NaN sigma (a bad step index) gives NaN coefficients.
template <typename acc_t, typename SamplerT>
DDPM_HD StepCoef<acc_t> step_coefficients(SamplerT sampler, acc_t s, acc_t s_next, acc_t churn, acc_t s_tmin,
                                          acc_t s_tmax) {
  StepCoef<acc_t> c{s, s_next, s, acc_t(0), s_next - s, s_next, acc_t(0), acc_t(1)};
  if (sampler == StepSampler::kEuler) {
    const acc_t gamma = (s_tmin <= s && s <= s_tmax) ? churn : acc_t(0);
    c.s_hat = s * (gamma + acc_t(1));
    c.c_churn = step_sqrt(c.s_hat * c.s_hat - s * s);
    c.c_derivative = s_next - c.s_hat;
    c.c_noise = acc_t(0);
  } else if (sampler == StepSampler::kEulerAncestral) {
    const acc_t s_up = step_sqrt(s_next * s_next * (s * s - s_next * s_next) / (s * s));
    c.c_derivative = step_sqrt(s_next * s_next - s_up * s_up) - s;
    c.c_noise = s_up;
  }
  if (sampler == StepSampler::kEuler || sampler == StepSampler::kEulerAncestral) {
    c.c_skip = s * s + acc_t(1);
    c.c_out = -s / step_sqrt(c.c_skip);
  }
  return c;
}

// One call of flow_step, euler_step or euler_ancestral_step, as csrc/host_ops.h hands it to a backend.
// Sigmas: the table form (sigmas and step_index non-null; the Euler samplers' only form) or two operands (sigma,
// sigma_next). uncond and guidance are non-null when guided; noise is non-null when given and the step has a
// noise term (adds_noise; in-kernel noise from `generator` when it has one and none is given); x0 is the x0
// output of an Euler step with return_pred_x0, else null.
struct FlowStepCall {
  StepSampler sampler;
  const at::Tensor &sample, &model_output;
  const at::Tensor* uncond;
  const at::Tensor* guidance;
  const at::Tensor* sigmas;
  const at::Tensor* step_index;
  const at::Tensor* sigma;
  int64_t sigma_period, sigma_repeat;
  const at::Tensor* sigma_next;
  int64_t sigma_next_period, sigma_next_repeat;
  EulerOptions euler;
  double guidance_rescale;
  const at::Tensor* noise;
  std::optional<at::Generator> generator;
  const at::Tensor* x0;
  const at::Tensor& out;
  int64_t sample_offset = 0;  // global index of the first sample in the noise stream

  bool guided() const { return uncond != nullptr; }
  bool per_token() const {
    return sigmas == nullptr && (sigma_period > 1 || sigma_next_period > 1);
  }
  bool adds_noise() const {
    return sampler == StepSampler::kFlowStochastic || sampler == StepSampler::kEulerAncestral ||
           (sampler == StepSampler::kEuler && euler.churn > 0);
  }
};

// SamplerT / ParamT: StepSampler / Param, GuidedT / TokenT: bool, or std::integral_constant of them
// (csrc/family.h). The noise source's present() says whether the step reads z. Ptrs: how the sample and the
// model outputs are read (csrc/mixed.h's MixedPtrs: each in its own dtype; scalar_t, the outputs', is then float).
template <typename scalar_t, typename SamplerT, typename ParamT, typename GuidedT, typename TokenT,
          typename Ptrs = SamePtrs<scalar_t>>
struct FlowStepKernel : NoPerSampleOutputs {
  using acc_t = at::opmath_type<scalar_t>;
  struct Coef : StepCoef<acc_t> {
    GuidanceCoef<acc_t> guide;
  };
  typename Ptrs::in x;
  scalar_t* out;
  scalar_t* x0_out;                // nullptr unless the x0 prediction is returned
  Guidance<scalar_t, Ptrs> guide;  // the model output (csrc/guidance.h); its rescale sums set by the backend's pass
  const acc_t* sigmas;       // the table form, else nullptr
  const int64_t* step_index;
  int64_t steps;  // len(sigmas)
  FlowSigma<acc_t> sigma, sigma_next;
  int64_t N;
  acc_t churn, s_tmin, s_tmax, s_noise;
  SamplerT sampler;
  ParamT param;
  GuidedT guided;
  TokenT per_token;

  static FlowStepKernel make(const FlowStepCall& call, SamplerT sampler, ParamT param, GuidedT guided,
                             TokenT per_token) {
    const bool table = call.sigmas != nullptr;
    const int64_t N = call.sample.numel() / call.sample.size(0);
    const EulerOptions& e = call.euler;
    return {{},
            Ptrs::input(call.sample),
            call.out.mutable_data_ptr<scalar_t>(),
            call.x0 != nullptr ? call.x0->mutable_data_ptr<scalar_t>() : nullptr,
            Guidance<scalar_t, Ptrs>::make(call.model_output, call.uncond, call.guidance, N, 0,
                                           call.guidance_rescale),
            table ? call.sigmas->const_data_ptr<acc_t>() : nullptr,
            table ? call.step_index->const_data_ptr<int64_t>() : nullptr,
            table ? call.sigmas->numel() : 0,
            {table ? nullptr : call.sigma->const_data_ptr<acc_t>(), call.sigma_period, call.sigma_repeat},
            {table ? nullptr : call.sigma_next->const_data_ptr<acc_t>(), call.sigma_next_period,
             call.sigma_next_repeat},
            N,
            static_cast<acc_t>(e.churn),
            static_cast<acc_t>(e.s_tmin),
            static_cast<acc_t>(e.s_tmax),
            static_cast<acc_t>(e.s_noise),
            sampler,
            param,
            guided,
            per_token};
  }

  DDPM_HD Coef coef(int64_t b) const {
    acc_t s, s_next;
    if (sigmas != nullptr) {
      const int64_t i = step_index[b];
      const bool ok = i >= 0 && i < steps - 1;
      s = ok ? sigmas[i] : acc_t(NAN);
      s_next = ok ? sigmas[i + 1] : acc_t(NAN);
    } else {
      // per-token operands are read per element; these stay unused
      s = sigma.per_token() ? acc_t(0) : sigma.flat[b];
      s_next = sigma_next.per_token() ? acc_t(0) : sigma_next.flat[b];
    }
    Coef c;
    static_cast<StepCoef<acc_t>&>(c) = step_coefficients(sampler, s, s_next, churn, s_tmin, s_tmax);
    c.guide = guided ? guide.coef(b) : GuidanceCoef<acc_t>{acc_t(0), acc_t(1)};
    return c;
  }

  // One element of an Euler sampler: x the sample, v the (guided) model output, z the noise when `noisy`;
  // writes the x0 prediction to x0. Every product is rounded before its sum (mul_rn), in the reference's order:
  // the first step of a zero-terminal-SNR table (sigma ~ 4096) cancels x + d (s' - s_hat) to a few thousandths
  // of x, where the step must be the rounding of the reference's (and the stock scheduler's) own operations.
  template <typename V>
  DDPM_LANE V euler_element(const Coef& c, V x, const V& v, const V& z, bool noisy, V& x0) const {
    if (sampler == StepSampler::kEuler && noisy) x = x + mul_rn(z * splat<V>(s_noise), splat<V>(c.c_churn));
    V d;
    if (param == Param::kEps) {
      x0 = x - mul_rn(splat<V>(c.s_hat), v);
      d = v;
    } else {
      x0 = param == Param::kX0 ? v : mul_rn(v, splat<V>(c.c_out)) + x / splat<V>(c.c_skip);
      d = (x - x0) / splat<V>(c.s_hat);
    }
    V r = x + mul_rn(d, splat<V>(c.c_derivative));
    if (sampler == StepSampler::kEulerAncestral && noisy) r = r + mul_rn(z, splat<V>(c.c_noise));
    return r;
  }

  template <typename IO, typename Z>
  DDPM_LANE void apply(int64_t b, int64_t i, int64_t n, const Coef& c, Z& z) const {
    using V = typename IO::V;
    V xv[IO::kLanes], vv[IO::kLanes], zv[IO::kLanes];
    IO::load(x + i, xv, n);
    IO::load(guide.cond + i, vv, n);
    if (guided) guide.template mix<IO>(b, i, n, c.guide, vv);
    if (z.present()) z.template get<IO>(i, n, zv);
    if (sampler == StepSampler::kEuler || sampler == StepSampler::kEulerAncestral) {
      V x0v[IO::kLanes];
      DDPM_UNROLL
      for (int k = 0; k < IO::kLanes; ++k) xv[k] = euler_element(c, xv[k], vv[k], zv[k], z.present(), x0v[k]);
      IO::store(out + i, xv, n);
      if (x0_out != nullptr) IO::store(x0_out + i, x0v, n);
      return;
    }
    V sv[IO::kLanes], snv[IO::kLanes];
    if (per_token && sigma.per_token()) {
      sigma_lanes<IO>(sigma, b, i - b * N, n, sv, lane_scalar_t<V>(0), Identity());
    } else {
      DDPM_UNROLL
      for (int k = 0; k < IO::kLanes; ++k) sv[k] = splat<V>(c.s);
    }
    if (per_token && sigma_next.per_token()) {
      sigma_lanes<IO>(sigma_next, b, i - b * N, n, snv, lane_scalar_t<V>(0), Identity());
    } else {
      DDPM_UNROLL
      for (int k = 0; k < IO::kLanes; ++k) snv[k] = splat<V>(c.s_next);
    }
    if (sampler == StepSampler::kFlowStochastic && z.present()) {
      DDPM_UNROLL
      for (int k = 0; k < IO::kLanes; ++k) {
        const V x0 = xv[k] - sv[k] * vv[k];
        xv[k] = madd(splat<V>(acc_t(1)) - snv[k], x0, snv[k] * zv[k]);
      }
    } else {
      DDPM_UNROLL
      for (int k = 0; k < IO::kLanes; ++k) xv[k] = madd(snv[k] - sv[k], vv[k], xv[k]);
    }
    IO::store(out + i, xv, n);
  }
};

// ------------------------------------------------------------------------------------------------- loss
struct FlowLossCall {
  const at::Tensor &model_output, &x0, &noise, &sigma;
  int64_t period, repeat;
  FlowWeighting weighting;
  bool l1;

  // Whether the operands have different dtypes (read each in its own by the backends that take such calls).
  bool mixed() const {
    return x0.scalar_type() != model_output.scalar_type() || noise.scalar_type() != model_output.scalar_type();
  }
};

// Forward sums and the backward pass. L1T / TokenT: bool, or std::integral_constant<bool, ...>. Ptrs: how the
// three operands are read and the gradient (model_output's dtype) written (csrc/mixed.h's MixedPtrs: each in
// its own dtype; scalar_t is then float).
template <typename scalar_t, typename L1T, typename TokenT, typename Ptrs = SamePtrs<scalar_t>>
struct FlowLossKernel : NoPerSampleOutputs {
  using acc_t = at::opmath_type<scalar_t>;
  struct Coef {
    acc_t scale;  // backward: g weight_b / (B N) (per-sample sigma), g / (B N) (per token)
  };
  typename Ptrs::in mo;
  typename Ptrs::in x0;
  typename Ptrs::in nz;
  FlowSigma<acc_t> sigma;
  FlowWeighting weighting;
  int64_t N;
  L1T l1;
  TokenT per_token;
  const acc_t* g_loss;  // backward: the incoming 0-d gradient, read in the kernel (no host sync)
  typename Ptrs::out grad;
  double count;  // B N

  static FlowLossKernel make(const FlowLossCall& call, L1T l1, TokenT per_token) {
    return {{},
            Ptrs::input(call.model_output),
            Ptrs::input(call.x0),
            Ptrs::input(call.noise),
            {call.sigma.const_data_ptr<acc_t>(), call.period, call.repeat},
            call.weighting,
            call.model_output.numel() / call.model_output.size(0),
            l1,
            per_token,
            nullptr,
            {},
            static_cast<double>(call.model_output.numel())};
  }

  static FlowLossKernel make_backward(const FlowLossCall& call, L1T l1, TokenT per_token, const at::Tensor& g,
                                      const at::Tensor& grad) {
    FlowLossKernel f = make(call, l1, per_token);
    f.g_loss = g.const_data_ptr<acc_t>();
    f.grad = Ptrs::output(grad);
    return f;
  }

  // Sample b's weight (1 when the weight is taken per element).
  DDPM_HD acc_t sample_weight(int64_t b) const {
    return per_token ? acc_t(1) : flow_loss_weight(weighting, sigma.flat[b]);
  }

  DDPM_HD Coef coef(int64_t b) const {
    return {static_cast<acc_t>(static_cast<double>(*g_loss) * static_cast<double>(sample_weight(b)) / count)};
  }

  // Per token: the cursor of sample b's sigma at element i (a loop that walks the sample in order advances it
  // with token_weights instead of dividing per slice).
  DDPM_HD TokenCursor token_cursor(int64_t b, int64_t i) const {
    return TokenCursor(i - b * N, sigma.period, sigma.repeat);
  }

  // d = mo - (noise - x0) over one slice; lanes past a short slice load as 0 and give d = 0.
  template <typename IO>
  DDPM_LANE void diffs(int64_t i, int64_t n, typename IO::V* d) const {
    using V = typename IO::V;
    V xv[IO::kLanes], nv[IO::kLanes];
    IO::load(mo + i, d, n);
    IO::load(x0 + i, xv, n);
    IO::load(nz + i, nv, n);
    DDPM_UNROLL
    for (int k = 0; k < IO::kLanes; ++k) d[k] = d[k] - (nv[k] - xv[k]);
  }

  // acc += l(d) (per token: weight l(d)) over one slice of sample b.
  template <typename IO>
  DDPM_LANE void accumulate(int64_t b, int64_t i, int64_t n, typename IO::V* acc) const {
    if (per_token) {
      TokenCursor cur = token_cursor(b, i);
      accumulate_at<IO>(b, i, n, cur, acc);
    } else {
      using V = typename IO::V;
      V d[IO::kLanes];
      diffs<IO>(i, n, d);
      // l2: d^2 added in one fused multiply-add
      DDPM_UNROLL
      for (int k = 0; k < IO::kLanes; ++k) acc[k] = l1 ? acc[k] + lane_abs(d[k]) : madd(d[k], d[k], acc[k]);
    }
  }

  // Per token: the same from the sigma's cursor at element i, left past the slice.
  template <typename IO>
  DDPM_LANE void accumulate_at(int64_t b, int64_t i, int64_t n, TokenCursor& cur, typename IO::V* acc) const {
    using V = typename IO::V;
    V d[IO::kLanes], wv[IO::kLanes];
    diffs<IO>(i, n, d);
    sigma_lanes_at<IO>(sigma.flat + b * sigma.period, cur, n, wv, lane_scalar_t<V>(0), WeightOf<acc_t>{weighting});
    DDPM_UNROLL
    for (int k = 0; k < IO::kLanes; ++k) acc[k] = madd(wv[k], l1 ? lane_abs(d[k]) : d[k] * d[k], acc[k]);
  }

  // The backward over one slice.
  template <typename IO, typename Z>
  DDPM_LANE void apply(int64_t b, int64_t i, int64_t n, const Coef& c, Z&) const {
    TokenCursor cur = per_token ? token_cursor(b, i) : TokenCursor(0, 1, 1);
    apply_at<IO>(b, i, n, c, cur);
  }

  // The same, per token from the sigma's cursor at element i, left past the slice.
  template <typename IO>
  DDPM_LANE void apply_at(int64_t b, int64_t i, int64_t n, const Coef& c, TokenCursor& cur) const {
    using V = typename IO::V;
    V d[IO::kLanes];
    diffs<IO>(i, n, d);
    DDPM_UNROLL
    for (int k = 0; k < IO::kLanes; ++k) d[k] = splat<V>(c.scale) * (l1 ? lane_sign(d[k]) : d[k] + d[k]);
    if (per_token) {
      V wv[IO::kLanes];
      sigma_lanes_at<IO>(sigma.flat + b * sigma.period, cur, n, wv, lane_scalar_t<V>(0), WeightOf<acc_t>{weighting});
      DDPM_UNROLL
      for (int k = 0; k < IO::kLanes; ++k) d[k] = d[k] * wv[k];
    }
    IO::store(grad + i, d, n);
  }
};

// The loss from the per-sample sums of l(d) (per-token: of weight l(d)): mean_b weight_b sum_b / N.
template <typename F>
DDPM_HD double flow_loss_total(const F& f, const double* sample_sums, int64_t B, int64_t N) {
  double total = 0;
  for (int64_t b = 0; b < B; ++b)
    total += static_cast<double>(f.sample_weight(b)) * (sample_sums[b] / static_cast<double>(N));
  return total / static_cast<double>(B);
}

}  // namespace ddpm
