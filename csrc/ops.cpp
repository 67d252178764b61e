// The schema of every ddpm_kernels operator, declared once. Kernels live in csrc/cpu (one library per CPU
// instruction set, loaded at runtime) and csrc/cuda; Python adds fake (meta) and autograd registrations in
// ddpm_kernels/extension.py.
//
// `table` is DiffusionSchedule.table(dtype) (float64 for float64 data, float32 otherwise); coefficients are
// gathered from it by t inside the kernels. Ops named *_out write into `out` (which may alias an input)
// and return nothing.
#include <Python.h>
#include <torch/library.h>

#include "python_methods.h"

// The module's Python functions (csrc/python_methods.h): the Python layer's fast argument check and the
// bound operator calls of the drop-in schedulers' steps.
static PyMethodDef kDdpmModuleMethods[] = {
    {"inputs_ok", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_inputs_ok)), METH_FASTCALL,
     "Whether a call's tensor arguments are the common valid case (see csrc/fast_checks.cpp)."},
    {"same_kind", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_same_kind)), METH_FASTCALL,
     "Whether tensors are plain tensors of a reference's dtype, sizes and device asking no gradient (see "
     "csrc/fast_checks.cpp)."},
    {"bind_op", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_bind_op)), METH_FASTCALL,
     "An operator with its constant arguments converted once, for call_bound (see csrc/fast_calls.cpp)."},
    {"call_bound", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_call_bound)), METH_FASTCALL,
     "A bound operator called with its per-call arguments (see csrc/fast_calls.cpp)."},
    {nullptr, nullptr, 0, nullptr},
};
#define DDPM_MODULE_METHODS kDdpmModuleMethods
#include "module.h"

#include <string>
#include <vector>

namespace {

const std::vector<at::Tag> kSeeded = {at::Tag::nondeterministic_seeded};

// An op and its *_out form, which takes the same arguments and then `Tensor(a!) out`, written once: `result` is
// what the op returns, `out_result` what the *_out form returns ("()", or the x0 of a step).
void def_with_out(torch::Library& m, const std::string& name, const std::string& args, const std::string& result,
                  const std::string& out_result, const std::vector<at::Tag>& tags = {}) {
  m.def((name + "(" + args + ") -> " + result).c_str(), tags);
  m.def((name + "_out(" + args + ", Tensor(a!) out) -> " + out_result).c_str(), tags);
}

}  // namespace

TORCH_LIBRARY(ddpm_kernels, m) {
  m.set_python_module("ddpm_kernels.extension");
  // Training forward: x_t = sqrt(ab_t) x_start + sqrt(1 - ab_t) noise; its backward gives both gradients in
  // one pass over the incoming gradient.
  def_with_out(m, "q_sample", "Tensor x_start, Tensor t, Tensor noise, Tensor table", "Tensor", "()");
  m.def("q_sample_backward(Tensor grad, Tensor t, Tensor table) -> (Tensor, Tensor)");
  m.def("predict_start_from_noise(Tensor x_t, Tensor t, Tensor noise, Tensor table) -> Tensor");
  m.def("predict_noise_from_start(Tensor x_t, Tensor t, Tensor x0, Tensor table) -> Tensor");
  m.def("get_v(Tensor x_start, Tensor noise, Tensor t, Tensor table) -> Tensor");
  m.def("predict_start_from_z_and_v(Tensor x_t, Tensor t, Tensor v, Tensor table) -> Tensor");
  m.def("predict_eps_from_z_and_v(Tensor x_t, Tensor t, Tensor v, Tensor table) -> Tensor");
  // (mean, posterior_variance, posterior_log_variance_clipped); the last two shaped (B, 1, ..., 1) in the
  // table's dtype.
  m.def("q_posterior(Tensor x_start, Tensor x_t, Tensor t, Tensor table) -> (Tensor, Tensor, Tensor)");
  m.def(
      "p_mean_variance(Tensor x_t, Tensor t, Tensor model_output, Tensor table, str parameterization, "
      "bool clip_denoised) -> (Tensor, Tensor, Tensor)");
  // One ancestral step. noise=None draws the normal noise inside the kernel from `generator` (or the
  // device's default generator), advancing its state; hence nondeterministic_seeded.
  def_with_out(
      m, "p_sample",
      "Tensor x_t, Tensor t, Tensor model_output, Tensor table, str parameterization, bool clip_denoised, "
      "Tensor? noise, Generator? generator, int sample_offset",
      "Tensor", "()", kSeeded);
  // Sampler steps t -> t_prev (per sample; t_prev = -1 is "after the last step"). `table64` is always the
  // float64 table (DiffusionSchedule.table(torch.float64)): the step coefficients are derived per sample
  // from alphas_cumprod in float64 (csrc/sampler_coefficients.h). They return (x_{t_prev}, x0); x0 is a
  // zero-element tensor unless return_pred_x0. The *_out forms write x_{t_prev} into `out` (which may be
  // x_t) and return x0. Dynamic thresholding is not part of the kernels (see ddpm_kernels/extension.py).
  // Guided when uncond (model_output's shape and layout) and guidance (the per-sample scales, compute dtype)
  // are given: the model output is u + w (c - u), std-rescaled when guidance_rescale > 0 (csrc/guidance.h).
  def_with_out(
      m, "ddim_step",
      "Tensor x_t, Tensor t, Tensor t_prev, Tensor model_output, Tensor? uncond, Tensor? guidance, Tensor table64, "
      "float eta, str parameterization, bool clip_denoised, float clip_range, bool set_alpha_to_one, "
      "bool use_clipped_model_output, float guidance_rescale, Tensor? noise, Generator? generator, int sample_offset, "
      "bool return_pred_x0",
      "(Tensor, Tensor)", "Tensor", kSeeded);
  // variance_type: fixed_small, fixed_small_log, fixed_large, fixed_large_log, learned, learned_range; the
  // learned ones read the variance channels from the second half of model_output's dim 1, (B, 2C, ...), and
  // guidance mixes only the first half.
  def_with_out(
      m, "ddpm_step",
      "Tensor x_t, Tensor t, Tensor t_prev, Tensor model_output, Tensor? uncond, Tensor? guidance, Tensor table64, "
      "str parameterization, str variance_type, bool clip_denoised, float clip_range, float guidance_rescale, "
      "Tensor? noise, Generator? generator, int sample_offset, bool return_pred_x0",
      "(Tensor, Tensor)", "Tensor", kSeeded);
  // (loss, loss_simple, loss_vlb) as 0-d tensors in model_output's dtype; backward w.r.t. model_output.
  m.def(
      "diffusion_loss(Tensor model_output, Tensor x_start, Tensor noise, Tensor t, Tensor table, "
      "str parameterization, str loss_type, float l_simple_weight, float original_elbo_weight) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "diffusion_loss_backward(Tensor grad_loss, Tensor grad_loss_simple, Tensor grad_loss_vlb, "
      "Tensor model_output, Tensor x_start, Tensor noise, Tensor t, Tensor table, str parameterization, "
      "str loss_type, float l_simple_weight, float original_elbo_weight) -> Tensor");
  // The flow-matching family (csrc/flow.h). A sigma operand is (sigma, sigma_period, sigma_repeat): the
  // contiguous (B * period,) tensor in the compute dtype (float64 for float64 data, else float32) that element
  // offset i of sample b reads at [b * period + (i / repeat) % period] (ddpm_kernels._spec.SigmaOperand).
  def_with_out(
      m, "flow_interpolate",
      "Tensor x0, Tensor noise, Tensor sigma, int sigma_period, int sigma_repeat",
      "Tensor", "()");
  m.def(
      "flow_interpolate_backward(Tensor grad, Tensor sigma, int sigma_period, int sigma_repeat) "
      "-> (Tensor, Tensor)");
  // One Euler step. Sigmas: the table `sigmas` gathered by `step_index` (int64 (B,)), or the operands sigma
  // and sigma_next. Guided when uncond and guidance (the per-sample scales, compute dtype) are given;
  // stochastic steps draw their noise inside the kernel from `generator` when noise is None.
  def_with_out(
      m, "flow_step",
      "Tensor sample, Tensor model_output, Tensor? uncond, Tensor? guidance, Tensor? sigmas, Tensor? step_index, "
      "Tensor? sigma, int sigma_period, int sigma_repeat, Tensor? sigma_next, int sigma_next_period, "
      "int sigma_next_repeat, bool stochastic, float guidance_rescale, Tensor? noise, Generator? generator, "
      "int sample_offset",
      "Tensor", "()", kSeeded);
  // The Euler steps on a Karras sigma table (diffusers' EulerDiscreteScheduler / EulerAncestralDiscreteScheduler):
  // the flow step's kernels with an Euler sampler (csrc/flow.h), sigmas gathered from the table by step_index.
  // They return (x', x0); x0 is a zero-element tensor unless return_pred_x0. The *_out forms write x' into `out`
  // (which may be sample) and return x0. Noise is read or drawn only when the step has a noise term (ancestral;
  // Euler with s_churn > 0).
  def_with_out(
      m, "euler_step",
      "Tensor sample, Tensor model_output, Tensor? uncond, Tensor? guidance, Tensor sigmas, Tensor step_index, "
      "str parameterization, float s_churn, float s_tmin, float s_tmax, float s_noise, float guidance_rescale, "
      "Tensor? noise, Generator? generator, int sample_offset, bool return_pred_x0",
      "(Tensor, Tensor)", "Tensor", kSeeded);
  def_with_out(
      m, "euler_ancestral_step",
      "Tensor sample, Tensor model_output, Tensor? uncond, Tensor? guidance, Tensor sigmas, Tensor step_index, "
      "str parameterization, float guidance_rescale, Tensor? noise, Generator? generator, int sample_offset, "
      "bool return_pred_x0",
      "(Tensor, Tensor)", "Tensor", kSeeded);
  // The loss as a 0-d tensor of the compute dtype; backward w.r.t. model_output.
  m.def(
      "flow_loss(Tensor model_output, Tensor x0, Tensor noise, Tensor sigma, int sigma_period, int sigma_repeat, "
      "str weighting, str loss_type) -> Tensor");
  m.def(
      "flow_loss_backward(Tensor grad_loss, Tensor model_output, Tensor x0, Tensor noise, Tensor sigma, "
      "int sigma_period, int sigma_repeat, str weighting, str loss_type) -> Tensor");
  // The multistep-solver family (csrc/solver.h): one step on a row of the solver's coefficient table
  // (ddpm_kernels._spec.SolverColumns), gathered by step_index (int64 (B,)); reads and writes the history ring
  // (H, *sample.shape) and the last-sample buffer in place. Guided when uncond and guidance (the per-sample
  // scales, compute dtype) are given; stochastic steps draw their noise inside the kernel from `generator` when
  // noise is None. Dynamic thresholding is not part of the kernels (see ddpm_kernels/extension.py).
  def_with_out(
      m, "solver_step",
      "Tensor sample, Tensor model_output, Tensor? uncond, Tensor? guidance, Tensor coefficients, Tensor step_index, "
      "Tensor(b!)? history, Tensor(c!)? last_sample, bool stochastic, float? clip_range, float guidance_rescale, "
      "Tensor? noise, Generator? generator, int sample_offset",
      "Tensor", "()", kSeeded);
}
