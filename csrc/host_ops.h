// The host side of every operator, shared by the CPU and CUDA backends: argument checks, output allocation,
// the functional forms built on the *_out forms (`Functional`), the empty-input cases, and the registration of
// every operator. A backend supplies only what runs its kernels: the static functions of its Kernels struct
// (csrc/backend.h). Each backend instantiates these templates with its own Kernels in its own translation
// unit (cpu/registration.cpp, cuda/registration.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#include "checks.h"
#include "flow.h"
#include "loss.h"
#include "pair_ops.h"
#include "posterior.h"
#include "sampler_coefficients.h"
#include "solver_host.h"

namespace ddpm {

// ------------------------------------------------------------------------------------------ functional forms
// The functional form of an out kernel `out_kernel(args..., out)`: `out` a new tensor like the first argument
// (the data), returned alone after a void out kernel, else as (out, what the out kernel returns: a step's x0).
// `out` has the data's dtype, or, with Operands<J...> (the positions of the call's float operands, tensors or
// optional tensors), their result_type: float32 for a mix that a backend reading mixed dtypes takes.
template <size_t... J>
struct Operands {};


template <typename F>
struct OutKernelTraits;

template <typename R, typename... A>
struct OutKernelTraits<R (*)(A...)> {
  using Result = R;
  using Params = std::tuple<A...>;  // the last one is `out`
  static constexpr size_t kArgs = sizeof...(A) - 1;
};

template <auto OutKernel, typename Ops = Operands<>,
          typename = std::make_index_sequence<OutKernelTraits<decltype(OutKernel)>::kArgs>>
struct Functional;

template <auto OutKernel, size_t... J, size_t... I>
struct Functional<OutKernel, Operands<J...>, std::index_sequence<I...>> {
  using Traits = OutKernelTraits<decltype(OutKernel)>;
  using R = typename Traits::Result;
  template <size_t K>
  using Arg = std::tuple_element_t<K, typename Traits::Params>;

  static at::Tensor allocate(const std::tuple<Arg<I>&...>& args) {
    const at::Tensor& x = std::get<0>(args);
    if constexpr (sizeof...(J) == 0) {
      return at::empty_like(x);
    } else {
      return at::empty_like(x, x.options().dtype(result_type({operand_ptr(std::get<J>(args))...})));
    }
  }

  static std::conditional_t<std::is_void_v<R>, at::Tensor, std::tuple<at::Tensor, R>> call(Arg<I>... args) {
    at::Tensor out = allocate(std::tuple<Arg<I>&...>(args...));
    if constexpr (std::is_void_v<R>) {
      OutKernel(std::forward<Arg<I>>(args)..., out);
      return out;
    } else {
      R result = OutKernel(std::forward<Arg<I>>(args)..., out);
      return {out, result};
    }
  }
};

// ------------------------------------------------------------------------------------------ two-operand ops
template <typename K>
void pair_out_kernel(PairOp op, const at::Tensor& x, const at::Tensor& y, const at::Tensor& t,
                     const at::Tensor& table, const at::Tensor& out) {
  check_common(x, t, table);
  check_operand<K>("second operand", y, x);
  check_output("out", out, x, result_type({&x, &y}));
  if (x.numel() == 0) return;
  K::pair(PairCall{op, x, &y, t, table, out, nullptr});
}

template <typename K, PairOp kOp>
at::Tensor pair_kernel(const at::Tensor& x, const at::Tensor& t, const at::Tensor& y, const at::Tensor& table) {
  at::Tensor out = at::empty_like(x, x.options().dtype(result_type({&x, &y})));
  pair_out_kernel<K>(kOp, x, y, t, table, out);
  return out;
}

template <typename K>
void q_sample_out_kernel(const at::Tensor& x_start, const at::Tensor& t, const at::Tensor& noise,
                         const at::Tensor& table, const at::Tensor& out) {
  pair_out_kernel<K>(PairOp::kQSample, x_start, noise, t, table, out);
}

template <typename K>
at::Tensor get_v_kernel(const at::Tensor& x_start, const at::Tensor& noise, const at::Tensor& t,
                        const at::Tensor& table) {
  return pair_kernel<K, PairOp::kGetV>(x_start, t, noise, table);
}

template <typename K>
std::tuple<at::Tensor, at::Tensor> q_sample_backward_kernel(const at::Tensor& grad, const at::Tensor& t,
                                                            const at::Tensor& table) {
  check_common(grad, t, table);
  at::Tensor gx = at::empty_like(grad);
  at::Tensor gn = at::empty_like(grad);
  if (grad.numel() > 0) K::pair(PairCall{PairOp::kQSample, grad, nullptr, t, table, gx, &gn});
  return {gx, gn};
}

// ----------------------------------------------------------------------------------- posterior / sampling
// (mean, var, log_var); var and log_var (B, 1, ..., 1) in the table's dtype.
// mean in the result dtype of x_t and mo (float32 for a mixed call).
template <typename K>
std::tuple<at::Tensor, at::Tensor, at::Tensor> mean_variance(const at::Tensor& x_t, const at::Tensor& t,
                                                             const at::Tensor& mo, const at::Tensor& table,
                                                             Param param, bool clip) {
  at::Tensor mean = at::empty_like(x_t, x_t.options().dtype(result_type({&x_t, &mo})));
  at::Tensor var = at::empty(per_sample_shape(x_t), table.options());
  at::Tensor log_var = at::empty(per_sample_shape(x_t), table.options());
  K::posterior(PosteriorCall{x_t, t, mo, table, param, clip, mean, &var, &log_var, false, nullptr, std::nullopt});
  return {mean, var, log_var};
}

template <typename K>
std::tuple<at::Tensor, at::Tensor, at::Tensor> q_posterior_kernel(const at::Tensor& x_start, const at::Tensor& x_t,
                                                                  const at::Tensor& t, const at::Tensor& table) {
  check_common(x_t, t, table);
  check_operand<K>("x_start", x_start, x_t);
  // The posterior mean is p_mean_variance's with x_start as an x0 prediction, unclipped.
  return mean_variance<K>(x_t, t, x_start, table, Param::kX0, false);
}

template <typename K>
std::tuple<at::Tensor, at::Tensor, at::Tensor> p_mean_variance_kernel(const at::Tensor& x_t, const at::Tensor& t,
                                                                      const at::Tensor& model_output,
                                                                      const at::Tensor& table,
                                                                      c10::string_view parameterization,
                                                                      bool clip_denoised) {
  check_common(x_t, t, table);
  check_operand<K>("model_output", model_output, x_t);
  const Param param = parse_param(std::string(parameterization));
  return mean_variance<K>(x_t, t, model_output, table, param, clip_denoised);
}

template <typename K>
void p_sample_out_kernel(const at::Tensor& x_t, const at::Tensor& t, const at::Tensor& model_output,
                         const at::Tensor& table, c10::string_view parameterization, bool clip_denoised,
                         const std::optional<at::Tensor>& noise, std::optional<at::Generator> generator,
                         int64_t sample_offset, const at::Tensor& out) {
  check_common(x_t, t, table);
  check_sample_offset(sample_offset);
  check_operand<K>("model_output", model_output, x_t);
  if (noise.has_value()) check_operand<K>("noise", *noise, x_t);
  check_output("out", out, x_t, result_type({&x_t, &model_output, operand_ptr(noise)}));
  const Param param = parse_param(std::string(parameterization));
  K::posterior(PosteriorCall{x_t, t, model_output, table, param, clip_denoised, out, nullptr, nullptr, true,
                            operand_ptr(noise), std::move(generator), sample_offset});
}

// ------------------------------------------------------------------------------------------- sampler steps
// Every step: checks, allocation, then the backend. `step` holds the sampler's own options; the
// parameterization, learned flag and noise are filled in here. Guided when uncond and guidance are given.
// Returns x0 (zero elements unless return_pred_x0).
template <typename K>
at::Tensor sampler_step(SamplerStep step, c10::string_view parameterization, const at::Tensor& x_t,
                        const at::Tensor& t, const at::Tensor& t_prev, const at::Tensor& model_output,
                        const std::optional<at::Tensor>& uncond, const std::optional<at::Tensor>& guidance,
                        const at::Tensor& table64, double guidance_rescale, const std::optional<at::Tensor>& noise,
                        std::optional<at::Generator> generator, int64_t sample_offset, bool return_pred_x0,
                        const at::Tensor& out) {
  check_sample_offset(sample_offset);
  step.learned = is_learned(step.variance);
  check_sampler<K>(x_t, t, t_prev, model_output, table64, step.learned);
  if (noise.has_value()) check_operand<K>("noise", *noise, x_t);
  // the outputs' dtype: the operands' one dtype, float32 for a mix (check_operand); an unread noise counts too
  const at::ScalarType type = result_type({&x_t, &model_output, operand_ptr(noise)});
  check_output("out", out, x_t, type);
  // uncond in model_output's shape, dtype and layout (a learned variance's channels included, unread)
  check_guidance(step.sampler == Sampler::kDdim ? "ddim_step" : "ddpm_step", uncond, guidance, guidance_rescale,
                 &model_output, x_t);
  step.param = parse_param(std::string(parameterization));
  const bool given = step.add_noise && noise.has_value();
  at::Tensor x0 = return_pred_x0 ? at::empty_like(x_t, x_t.options().dtype(type))
                                 : at::empty({0}, x_t.options().dtype(type));
  K::sampler_step(SamplerCall{step, x_t, t, t_prev, model_output, uncond.has_value() ? &*uncond : nullptr,
                              guidance.has_value() ? &*guidance : nullptr, guidance_rescale, table64,
                              given ? &*noise : nullptr, std::move(generator), return_pred_x0 ? &x0 : nullptr, out,
                              sample_offset});
  return x0;
}

template <typename K>
at::Tensor ddim_step_out_kernel(const at::Tensor& x_t, const at::Tensor& t, const at::Tensor& t_prev,
                                const at::Tensor& model_output, const std::optional<at::Tensor>& uncond,
                                const std::optional<at::Tensor>& guidance, const at::Tensor& table64, double eta,
                                c10::string_view parameterization, bool clip_denoised, double clip_range,
                                bool set_alpha_to_one, bool use_clipped_model_output, double guidance_rescale,
                                const std::optional<at::Tensor>& noise, std::optional<at::Generator> generator,
                                int64_t sample_offset, bool return_pred_x0, const at::Tensor& out) {
  // eta == 0 has no noise term: nothing is read or drawn (as the reference)
  const SamplerStep step{Sampler::kDdim, Param::kEps, Variance::kFixedSmall, false, eta > 0, clip_denoised,
                         set_alpha_to_one, use_clipped_model_output, eta, clip_range};
  return sampler_step<K>(step, parameterization, x_t, t, t_prev, model_output, uncond, guidance, table64,
                         guidance_rescale, noise, std::move(generator), sample_offset, return_pred_x0, out);
}

template <typename K>
at::Tensor ddpm_step_out_kernel(const at::Tensor& x_t, const at::Tensor& t, const at::Tensor& t_prev,
                                const at::Tensor& model_output, const std::optional<at::Tensor>& uncond,
                                const std::optional<at::Tensor>& guidance, const at::Tensor& table64,
                                c10::string_view parameterization, c10::string_view variance_type,
                                bool clip_denoised, double clip_range, double guidance_rescale,
                                const std::optional<at::Tensor>& noise, std::optional<at::Generator> generator,
                                int64_t sample_offset, bool return_pred_x0, const at::Tensor& out) {
  const SamplerStep step{Sampler::kDdpm, Param::kEps, parse_variance(std::string(variance_type)), false, true,
                         clip_denoised, true, false, 0.0, clip_range};
  return sampler_step<K>(step, parameterization, x_t, t, t_prev, model_output, uncond, guidance, table64,
                         guidance_rescale, noise, std::move(generator), sample_offset, return_pred_x0, out);
}

// ------------------------------------------------------------------------------------------------ loss
// The checks of both loss ops, and the call they describe.
template <typename K>
LossCall loss_call(const at::Tensor& model_output, const at::Tensor& x_start, const at::Tensor& noise,
                          const at::Tensor& t, const at::Tensor& table, c10::string_view parameterization,
                          c10::string_view loss_type, double l_simple_weight, double original_elbo_weight) {
  check_common(model_output, t, table);
  check_operand<K>("x_start", x_start, model_output);
  check_operand<K>("noise", noise, model_output);
  return {model_output,
          x_start,
          noise,
          t,
          table,
          parse_param(std::string(parameterization)),
          parse_l1(std::string(loss_type)),
          l_simple_weight,
          original_elbo_weight};
}

template <typename K>
std::tuple<at::Tensor, at::Tensor, at::Tensor> diffusion_loss_kernel(
    const at::Tensor& model_output, const at::Tensor& x_start, const at::Tensor& noise, const at::Tensor& t,
    const at::Tensor& table, c10::string_view parameterization, c10::string_view loss_type, double l_simple_weight,
    double original_elbo_weight) {
  const LossCall call = loss_call<K>(model_output, x_start, noise, t, table, parameterization, loss_type,
                                     l_simple_weight, original_elbo_weight);
  // the result dtype of the operands (float32 for a mixed call)
  const auto opts = model_output.options().dtype(result_type({&model_output, &x_start, &noise}));
  if (model_output.numel() == 0) {
    // The mean over no elements (an empty batch, or samples of zero elements) is NaN, as torch.mean and
    // the reference give; NaN weighted by anything stays NaN.
    const double nan = std::numeric_limits<double>::quiet_NaN();
    return {at::full({}, nan, opts), at::full({}, nan, opts), at::full({}, nan, opts)};
  }
  at::Tensor loss = at::empty({}, opts), loss_simple = at::empty({}, opts), loss_vlb = at::empty({}, opts);
  K::diffusion_loss(call, loss, loss_simple, loss_vlb);
  return {loss, loss_simple, loss_vlb};
}

template <typename K>
at::Tensor diffusion_loss_backward_kernel(const at::Tensor& grad_loss, const at::Tensor& grad_loss_simple,
                                          const at::Tensor& grad_loss_vlb, const at::Tensor& model_output,
                                          const at::Tensor& x_start, const at::Tensor& noise, const at::Tensor& t,
                                          const at::Tensor& table, c10::string_view parameterization,
                                          c10::string_view loss_type, double l_simple_weight,
                                          double original_elbo_weight) {
  const LossCall call = loss_call<K>(model_output, x_start, noise, t, table, parameterization, loss_type,
                                     l_simple_weight, original_elbo_weight);
  at::Tensor grad = at::empty_like(model_output);
  if (model_output.numel() == 0) return grad;
  // The kernels read the incoming gradients where the data lives (no host sync), in the losses' dtype (the
  // result dtype of the operands); the gradient is written in model_output's.
  const at::ScalarType loss_type_ = result_type({&model_output, &x_start, &noise});
  const auto operand = [&](const at::Tensor& g) {
    TORCH_CHECK(g.numel() == 1, "ddpm_kernels: the loss gradients must be one-element tensors, got ", g.sizes());
    return g.to(model_output.device(), loss_type_);
  };
  K::diffusion_loss_backward(call, operand(grad_loss), operand(grad_loss_simple), operand(grad_loss_vlb), grad);
  return grad;
}

// ------------------------------------------------------------------------------------------ flow matching
template <typename K>
void flow_interpolate_out_kernel(const at::Tensor& x0, const at::Tensor& noise, const at::Tensor& sigma,
                                 int64_t sigma_period, int64_t sigma_repeat, const at::Tensor& out) {
  check_batch(x0);
  dense_format(x0, "x0");
  check_operand<K>("noise", noise, x0);
  check_output("out", out, x0, result_type({&x0, &noise}));
  check_sigma("sigma", sigma, sigma_period, sigma_repeat, x0);
  if (x0.numel() == 0) return;
  K::flow_interpolate(FlowInterpolateCall{x0, &noise, sigma, sigma_period, sigma_repeat, out, nullptr});
}

template <typename K>
std::tuple<at::Tensor, at::Tensor> flow_interpolate_backward_kernel(const at::Tensor& grad, const at::Tensor& sigma,
                                                                    int64_t sigma_period, int64_t sigma_repeat) {
  check_batch(grad);
  dense_format(grad, "grad");
  check_sigma("sigma", sigma, sigma_period, sigma_repeat, grad);
  at::Tensor gx = at::empty_like(grad);
  at::Tensor gn = at::empty_like(grad);
  if (grad.numel() > 0) {
    K::flow_interpolate(FlowInterpolateCall{grad, nullptr, sigma, sigma_period, sigma_repeat, gx, &gn});
  }
  return {gx, gn};
}

// The checks every step of the flow family shares (`op` names it): the data, the noise stream's sample_offset,
// then check_table_step.
template <typename K>
void check_flow_step(const char* op, const at::Tensor& sample, const at::Tensor& model_output,
                     const std::optional<at::Tensor>& uncond, const std::optional<at::Tensor>& guidance,
                     double guidance_rescale, const std::optional<at::Tensor>& noise, int64_t sample_offset,
                     const at::Tensor& out) {
  check_batch(sample);
  check_sample_offset(sample_offset);
  dense_format(sample, "sample");
  check_table_step<K>(op, sample, model_output, uncond, guidance, guidance_rescale, noise, out);
}

// The table form of a step's sigmas: a contiguous 1-D table in the compute dtype and a step index per sample.
inline void check_sigma_table(const at::Tensor& sigmas, const at::Tensor& step_index, const at::Tensor& sample) {
  TORCH_CHECK(sigmas.scalar_type() == compute_type(sample) && sigmas.dim() == 1 && sigmas.numel() >= 1 &&
                  sigmas.is_contiguous() && sigmas.device() == sample.device(),
              "ddpm_kernels: sigmas must be a contiguous 1-D ", compute_type(sample), " table on ", sample.device(),
              ", got ", sigmas.scalar_type(), " ", sigmas.sizes());
  check_timesteps("step_index", step_index, sample);
}

template <typename K>
void flow_step_out_kernel(const at::Tensor& sample, const at::Tensor& model_output,
                          const std::optional<at::Tensor>& uncond, const std::optional<at::Tensor>& guidance,
                          const std::optional<at::Tensor>& sigmas, const std::optional<at::Tensor>& step_index,
                          const std::optional<at::Tensor>& sigma, int64_t sigma_period, int64_t sigma_repeat,
                          const std::optional<at::Tensor>& sigma_next, int64_t sigma_next_period,
                          int64_t sigma_next_repeat, bool stochastic, double guidance_rescale,
                          const std::optional<at::Tensor>& noise, std::optional<at::Generator> generator,
                          int64_t sample_offset, const at::Tensor& out) {
  check_flow_step<K>("flow_step", sample, model_output, uncond, guidance, guidance_rescale, noise, sample_offset,
                     out);
  const bool table = sigmas.has_value() || step_index.has_value();
  if (table) {
    TORCH_CHECK(sigmas.has_value() && step_index.has_value() && !sigma.has_value() && !sigma_next.has_value(),
                "ddpm_kernels: flow_step takes either the table (sigmas, step_index) or sigma and sigma_next");
    check_sigma_table(*sigmas, *step_index, sample);
  } else {
    TORCH_CHECK(sigma.has_value() && sigma_next.has_value(),
                "ddpm_kernels: flow_step takes either the table (sigmas, step_index) or sigma and sigma_next");
    check_sigma("sigma", *sigma, sigma_period, sigma_repeat, sample);
    check_sigma("sigma_next", *sigma_next, sigma_next_period, sigma_next_repeat, sample);
  }
  const bool given = stochastic && noise.has_value();
  K::flow_step(FlowStepCall{stochastic ? StepSampler::kFlowStochastic : StepSampler::kFlow, sample, model_output,
                            uncond.has_value() ? &*uncond : nullptr, guidance.has_value() ? &*guidance : nullptr,
                            table ? &*sigmas : nullptr, table ? &*step_index : nullptr, table ? nullptr : &*sigma,
                            sigma_period, sigma_repeat, table ? nullptr : &*sigma_next, sigma_next_period,
                            sigma_next_repeat, EulerOptions{}, guidance_rescale, given ? &*noise : nullptr,
                            std::move(generator), nullptr, out, sample_offset});
}

// ------------------------------------------------------------------------------------------- Euler steps
// euler_step and euler_ancestral_step: the flow step's kernels with an Euler sampler (csrc/flow.h), on the sigma
// table only. Writes the step into `out` and returns x0 (zero elements unless return_pred_x0). The noise is read
// or drawn only when the step has a noise term (ancestral; Euler with churn).
template <typename K>
at::Tensor euler_out(StepSampler sampler, EulerOptions euler, c10::string_view parameterization,
                     const at::Tensor& sample, const at::Tensor& model_output,
                     const std::optional<at::Tensor>& uncond, const std::optional<at::Tensor>& guidance,
                     const at::Tensor& sigmas, const at::Tensor& step_index, double guidance_rescale,
                     const std::optional<at::Tensor>& noise, std::optional<at::Generator> generator,
                     int64_t sample_offset, bool return_pred_x0, const at::Tensor& out) {
  check_flow_step<K>(sampler == StepSampler::kEuler ? "euler_step" : "euler_ancestral_step", sample, model_output,
                     uncond, guidance, guidance_rescale, noise, sample_offset, out);
  check_sigma_table(sigmas, step_index, sample);
  euler.param = parse_param(std::string(parameterization));
  const auto x0_options = sample.options().dtype(out.scalar_type());
  at::Tensor x0 = return_pred_x0 ? at::empty_like(sample, x0_options) : at::empty({0}, x0_options);
  FlowStepCall call{sampler, sample, model_output, uncond.has_value() ? &*uncond : nullptr,
                    guidance.has_value() ? &*guidance : nullptr, &sigmas, &step_index, nullptr, 1, 1, nullptr, 1, 1,
                    euler, guidance_rescale, nullptr, std::move(generator), return_pred_x0 ? &x0 : nullptr, out,
                    sample_offset};
  if (call.adds_noise() && noise.has_value()) call.noise = &*noise;
  K::flow_step(call);
  return x0;
}

template <typename K>
at::Tensor euler_step_out_kernel(const at::Tensor& sample, const at::Tensor& model_output,
                                 const std::optional<at::Tensor>& uncond, const std::optional<at::Tensor>& guidance,
                                 const at::Tensor& sigmas, const at::Tensor& step_index,
                                 c10::string_view parameterization, double s_churn, double s_tmin, double s_tmax,
                                 double s_noise, double guidance_rescale, const std::optional<at::Tensor>& noise,
                                 std::optional<at::Generator> generator, int64_t sample_offset, bool return_pred_x0,
                                 const at::Tensor& out) {
  TORCH_CHECK(s_churn >= 0, "ddpm_kernels: s_churn must be >= 0, got ", s_churn);
  TORCH_CHECK(!std::isnan(s_tmin) && !std::isnan(s_tmax), "ddpm_kernels: s_tmin and s_tmax must not be NaN");
  TORCH_CHECK(std::isfinite(s_noise), "ddpm_kernels: s_noise must be finite, got ", s_noise);
  EulerOptions euler;
  // gamma inside the window (the reference's min(s_churn / (len(sigmas) - 1), sqrt(2) - 1)); 0: no churn
  euler.churn = s_churn > 0 ? std::min(s_churn / static_cast<double>(sigmas.numel() - 1), std::sqrt(2.0) - 1) : 0.0;
  euler.s_tmin = s_tmin;
  euler.s_tmax = s_tmax;
  euler.s_noise = s_noise;
  return euler_out<K>(StepSampler::kEuler, euler, parameterization, sample, model_output, uncond, guidance, sigmas,
                      step_index, guidance_rescale, noise, std::move(generator), sample_offset, return_pred_x0, out);
}

template <typename K>
at::Tensor euler_ancestral_step_out_kernel(const at::Tensor& sample, const at::Tensor& model_output,
                                           const std::optional<at::Tensor>& uncond,
                                           const std::optional<at::Tensor>& guidance, const at::Tensor& sigmas,
                                           const at::Tensor& step_index, c10::string_view parameterization,
                                           double guidance_rescale, const std::optional<at::Tensor>& noise,
                                           std::optional<at::Generator> generator, int64_t sample_offset,
                                           bool return_pred_x0, const at::Tensor& out) {
  return euler_out<K>(StepSampler::kEulerAncestral, EulerOptions{}, parameterization, sample, model_output, uncond,
                      guidance, sigmas, step_index, guidance_rescale, noise, std::move(generator), sample_offset,
                      return_pred_x0, out);
}

// ------------------------------------------------------------------------------------------ flow loss
template <typename K>
FlowLossCall flow_loss_call(const at::Tensor& model_output, const at::Tensor& x0, const at::Tensor& noise,
                            const at::Tensor& sigma, int64_t sigma_period, int64_t sigma_repeat,
                            c10::string_view weighting, c10::string_view loss_type) {
  check_batch(model_output);
  dense_format(model_output, "model_output");
  check_operand<K>("x0", x0, model_output);
  check_operand<K>("noise", noise, model_output);
  check_sigma("sigma", sigma, sigma_period, sigma_repeat, model_output);
  return {model_output, x0, noise, sigma, sigma_period, sigma_repeat, parse_weighting(std::string(weighting)),
          parse_l1(std::string(loss_type))};
}

// A 0-d tensor of the compute dtype: the loss in float32 for float16/bfloat16/float32 data (SD3 / Flux scripts'
// float loss), float64 for float64.
template <typename K>
at::Tensor flow_loss_kernel(const at::Tensor& model_output, const at::Tensor& x0, const at::Tensor& noise,
                            const at::Tensor& sigma, int64_t sigma_period, int64_t sigma_repeat,
                            c10::string_view weighting, c10::string_view loss_type) {
  const FlowLossCall call =
      flow_loss_call<K>(model_output, x0, noise, sigma, sigma_period, sigma_repeat, weighting, loss_type);
  const auto opts = model_output.options().dtype(compute_type(model_output));
  // the mean over no elements is NaN, as torch.mean and the reference give
  if (model_output.numel() == 0) return at::full({}, std::numeric_limits<double>::quiet_NaN(), opts);
  at::Tensor loss = at::empty({}, opts);
  K::flow_loss(call, loss);
  return loss;
}

template <typename K>
at::Tensor flow_loss_backward_kernel(const at::Tensor& grad_loss, const at::Tensor& model_output,
                                     const at::Tensor& x0, const at::Tensor& noise, const at::Tensor& sigma,
                                     int64_t sigma_period, int64_t sigma_repeat, c10::string_view weighting,
                                     c10::string_view loss_type) {
  const FlowLossCall call =
      flow_loss_call<K>(model_output, x0, noise, sigma, sigma_period, sigma_repeat, weighting, loss_type);
  at::Tensor grad = at::empty_like(model_output);
  if (model_output.numel() == 0) return grad;
  TORCH_CHECK(grad_loss.numel() == 1, "ddpm_kernels: the loss gradient must be a one-element tensor, got ",
              grad_loss.sizes());
  // read where the data lives (no host sync), in the compute dtype
  const at::Tensor g = grad_loss.to(model_output.device(), compute_type(model_output)).reshape({}).contiguous();
  K::flow_loss_backward(call, g, grad);
  return grad;
}

// ------------------------------------------------------------------------------------------ registration
// An op's *_out kernel and its functional form (`Functional`).
template <auto OutKernel, typename Ops = Operands<>>
void impl_with_out(torch::Library& m, const std::string& name) {
  m.impl(name.c_str(), &Functional<OutKernel, Ops>::call);
  m.impl((name + "_out").c_str(), OutKernel);
}

template <typename K>
void register_kernels(torch::Library& m) {
  m.impl("q_sample", &pair_kernel<K, PairOp::kQSample>);
  m.impl("q_sample_out", &q_sample_out_kernel<K>);
  m.impl("q_sample_backward", &q_sample_backward_kernel<K>);
  m.impl("predict_start_from_noise", &pair_kernel<K, PairOp::kPredictStartFromNoise>);
  m.impl("predict_noise_from_start", &pair_kernel<K, PairOp::kPredictNoiseFromStart>);
  m.impl("get_v", &get_v_kernel<K>);
  m.impl("predict_start_from_z_and_v", &pair_kernel<K, PairOp::kPredictStartFromZAndV>);
  m.impl("predict_eps_from_z_and_v", &pair_kernel<K, PairOp::kPredictEpsFromZAndV>);
  m.impl("q_posterior", &q_posterior_kernel<K>);
  m.impl("p_mean_variance", &p_mean_variance_kernel<K>);
  // Operands<...>: the outputs' dtype is the result dtype of these arguments (the data, model output(s), noise)
  impl_with_out<&p_sample_out_kernel<K>, Operands<0, 2, 6>>(m, "p_sample");
  m.impl("diffusion_loss", &diffusion_loss_kernel<K>);
  m.impl("diffusion_loss_backward", &diffusion_loss_backward_kernel<K>);
  impl_with_out<&ddim_step_out_kernel<K>, Operands<0, 3, 14>>(m, "ddim_step");
  impl_with_out<&ddpm_step_out_kernel<K>, Operands<0, 3, 12>>(m, "ddpm_step");
  impl_with_out<&flow_interpolate_out_kernel<K>, Operands<0, 1>>(m, "flow_interpolate");
  m.impl("flow_interpolate_backward", &flow_interpolate_backward_kernel<K>);
  impl_with_out<&flow_step_out_kernel<K>, Operands<0, 1, 2, 14>>(m, "flow_step");
  impl_with_out<&euler_step_out_kernel<K>, Operands<0, 1, 2, 12>>(m, "euler_step");
  impl_with_out<&euler_ancestral_step_out_kernel<K>, Operands<0, 1, 2, 8>>(m, "euler_ancestral_step");
  m.impl("flow_loss", &flow_loss_kernel<K>);
  m.impl("flow_loss_backward", &flow_loss_backward_kernel<K>);
  // the multistep-solver family (csrc/solver_host.h)
  impl_with_out<&solver_step_out_kernel<K>, Operands<0, 1, 2, 11>>(m, "solver_step");
}

}  // namespace ddpm
