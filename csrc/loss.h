// The loss family: diffusion_loss (forward, a reduction) and its backward w.r.t. model_output (elementwise).
//
//   d          = model_output - target, target by parameterization: noise (eps), x_start (x0),
//                get_v(x_start, noise) (v)
//   per_sample = mean over the sample of |d| (l1) or d^2 (l2)
//   loss_simple = mean_b per_sample,  loss_vlb = mean_b lvlb_weights[t_b] per_sample,
//   loss        = l_simple_weight loss_simple + original_elbo_weight loss_vlb
// and the gradient, contracted with the incoming gradients of the three outputs:
//   grad_i = [g_loss (w_simple + w_elbo lvlb_b) + g_simple + g_vlb lvlb_b] / (B N) * dl(d_i),
//   dl(d)  = 2 d (l2) or sign(d) (l1).
// The reductions differ per backend (csrc/cpu/loss.cpp, csrc/cuda/loss.cu); what is summed, and how the sums
// become the outputs, is here.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

#include "coefficients.h"

namespace ddpm {

template <typename acc_t>
struct LossCoef {
  acc_t tgt_x, tgt_n, weight;  // target = tgt_x x_start + tgt_n noise (v); weight: lvlb_weights[t]
};

template <typename acc_t, typename table_t>
DDPM_HD LossCoef<acc_t> loss_coefficients(Param param, const table_t* table, int64_t T, int64_t t) {
  LossCoef<acc_t> c;
  if (param == Param::kEps) {
    c.tgt_x = acc_t(0);
    c.tgt_n = acc_t(1);
    c.weight = gather<acc_t>(table, T, kLvlbWeightsEps, t);
  } else if (param == Param::kX0) {
    c.tgt_x = acc_t(1);
    c.tgt_n = acc_t(0);
    c.weight = gather<acc_t>(table, T, kLvlbWeightsX0, t);
  } else {
    c.tgt_x = -gather<acc_t>(table, T, kSqrtOneMinusAlphasCumprod, t);
    c.tgt_n = gather<acc_t>(table, T, kSqrtAlphasCumprod, t);
    c.weight = gather<acc_t>(table, T, kLvlbWeightsV, t);
  }
  return c;
}

// Per-sample sums of the loss terms -> (loss, loss_simple, loss_vlb), in float64 whatever the data's dtype.
struct LossTotals {
  double simple = 0, vlb = 0;
  DDPM_HD void add_sample(double sum, int64_t N, double weight) {
    const double per_sample = sum / static_cast<double>(N);
    simple += per_sample;
    vlb += weight * per_sample;
  }
  template <typename scalar_t>
  DDPM_HD void store(int64_t B, double w_simple, double w_elbo, scalar_t* loss, scalar_t* loss_simple,
                     scalar_t* loss_vlb) const {
    const double s = simple / static_cast<double>(B), v = vlb / static_cast<double>(B);
    *loss = static_cast<scalar_t>(w_simple * s + w_elbo * v);
    *loss_simple = static_cast<scalar_t>(s);
    *loss_vlb = static_cast<scalar_t>(v);
  }
};

// One call of the family's ops, as csrc/host_ops.h hands it to a backend (with the outputs, or the incoming
// gradients and the gradient).
struct LossCall {
  const at::Tensor &model_output, &x_start, &noise, &t, &table;
  Param param;
  bool l1;
  double l_simple_weight, original_elbo_weight;
};

// Forward and backward. ParamT / L1T: Param / bool, or std::integral_constant of them (see csrc/family.h).
// scalar_t: the compute dtype's data type (the promoted one of a mixed call); Ptrs: how the three operands and
// the gradient (model_output's dtype) are addressed (csrc/family.h).
template <typename scalar_t, typename ParamT, typename L1T, typename Ptrs = SamePtrs<scalar_t>>
struct LossKernel : NoPerSampleOutputs {
  using acc_t = at::opmath_type<scalar_t>;
  struct Coef {
    LossCoef<acc_t> loss;
    acc_t grad_scale;  // backward: the bracket above over (B N), in float64 rounded once
  };
  typename Ptrs::in mo;
  typename Ptrs::in xs;
  typename Ptrs::in nz;
  Timesteps<acc_t> ts;
  ParamT param;
  L1T l1;
  // backward: the incoming gradients (one-element tensors read in the kernel: no host sync) and the output
  const scalar_t* g_loss;
  const scalar_t* g_simple;
  const scalar_t* g_vlb;
  typename Ptrs::out grad;
  double w_simple, w_elbo, count;

  static LossKernel make(const LossCall& call, ParamT param, L1T l1) {
    return {{},
            Ptrs::input(call.model_output),
            Ptrs::input(call.x_start),
            Ptrs::input(call.noise),
            Timesteps<acc_t>::of(call.t, call.table),
            param,
            l1,
            nullptr,
            nullptr,
            nullptr,
            {},
            call.l_simple_weight,
            call.original_elbo_weight,
            static_cast<double>(call.model_output.numel())};
  }

  static LossKernel make_backward(const LossCall& call, ParamT param, L1T l1, const at::Tensor& grad_loss,
                                  const at::Tensor& grad_loss_simple, const at::Tensor& grad_loss_vlb,
                                  const at::Tensor& grad) {
    LossKernel f = make(call, param, l1);
    f.g_loss = grad_loss.const_data_ptr<scalar_t>();
    f.g_simple = grad_loss_simple.const_data_ptr<scalar_t>();
    f.g_vlb = grad_loss_vlb.const_data_ptr<scalar_t>();
    f.grad = Ptrs::output(grad);
    return f;
  }

  DDPM_HD LossCoef<acc_t> loss_coef(int64_t b) const {
    return loss_coefficients<acc_t>(param, ts.table, ts.T, ts.t[b]);
  }

  DDPM_HD Coef coef(int64_t b) const {
    Coef c;
    c.loss = loss_coef(b);
    const double w = static_cast<double>(c.loss.weight);
    const double g = static_cast<double>(*g_loss), gs = static_cast<double>(*g_simple),
                 gv = static_cast<double>(*g_vlb);
    c.grad_scale = static_cast<acc_t>((g * (w_simple + w_elbo * w) + gs + gv * w) / count);
    return c;
  }

  // d over one slice; lanes past a short slice load as 0 and give d = 0, which adds nothing to a sum.
  template <typename IO>
  DDPM_LANE void diffs(int64_t i, int64_t n, const LossCoef<acc_t>& c, typename IO::V* d) const {
    using V = typename IO::V;
    V mv[IO::kLanes], xv[IO::kLanes], nv[IO::kLanes];
    IO::load(mo + i, mv, n);
    if (param != Param::kEps) IO::load(xs + i, xv, n);
    if (param != Param::kX0) IO::load(nz + i, nv, n);
    DDPM_UNROLL
    for (int k = 0; k < IO::kLanes; ++k) {
      if (param == Param::kEps) {
        d[k] = mv[k] - nv[k];
      } else if (param == Param::kX0) {
        d[k] = mv[k] - xv[k];
      } else {
        d[k] = mv[k] - madd(splat<V>(c.tgt_x), xv[k], splat<V>(c.tgt_n) * nv[k]);
      }
    }
  }

  // acc += |d| (l1) or d^2 (l2) over one slice.
  template <typename IO>
  DDPM_LANE void accumulate(int64_t i, int64_t n, const LossCoef<acc_t>& c, typename IO::V* acc) const {
    typename IO::V d[IO::kLanes];
    diffs<IO>(i, n, c, d);
    DDPM_UNROLL
    for (int k = 0; k < IO::kLanes; ++k) acc[k] = l1 ? acc[k] + lane_abs(d[k]) : madd(d[k], d[k], acc[k]);
  }

  // The backward over one slice: grad = grad_scale dl(d).
  template <typename IO, typename Z>
  DDPM_LANE void apply(int64_t, int64_t i, int64_t n, const Coef& c, Z&) const {
    using V = typename IO::V;
    V d[IO::kLanes];
    diffs<IO>(i, n, c.loss, d);
    DDPM_UNROLL
    for (int k = 0; k < IO::kLanes; ++k) d[k] = splat<V>(c.grad_scale) * (l1 ? lane_sign(d[k]) : d[k] + d[k]);
    IO::store(grad + i, d, n);
  }
};

}  // namespace ddpm
