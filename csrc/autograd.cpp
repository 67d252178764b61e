// The autograd formulas of the differentiable operators, in C++ at the Autograd dispatch key, so one
// registration serves the CPU and CUDA kernels (it calls them through the dispatcher). They live here rather
// than in Python (torch.library.register_autograd) for two reasons: the autograd.Function that
// register_autograd generates defines no setup_context, so torch.func transforms (grad, vjp) refuse it; and
// its Python wrapper costs more per call than the loss kernels themselves on typical training shapes.
//
// Each kernel records a plain autograd Node, as torch's own generated kernels do (VariableType), and not a
// torch::autograd::Function: torch.func transforms refuse C++ Functions too, but treat a Node like any
// built-in op's.
//
//   q_sample            d/dx_start = sqrt(ab_t) g, d/dnoise = sqrt(1 - ab_t) g: q_sample_backward, one pass
//   q_sample_backward   linear in g with q_sample's coefficients, so its backward is q_sample again (double
//                       backward, and any higher order, works)
//   diffusion_loss      d/dmodel_output from diffusion_loss_backward, one pass. x_start and noise get no
//                       gradient from the kernels: the Python layer sends a call that needs those gradients to
//                       the reference, and a direct call of the operator that needs them is an error, not a
//                       silent zero.
//   flow_interpolate    d/dx0 = (1 - sigma) g, d/dnoise = sigma g: flow_interpolate_backward, one pass; its own
//                       backward is flow_interpolate again. sigma gets no gradient from the kernels (the
//                       Python layer sends a call that needs it to the reference; a direct call that needs it
//                       is an error).
//   flow_loss           d/dmodel_output from flow_loss_backward, one pass; x0, noise and sigma as
//                       diffusion_loss's x_start and noise.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <initializer_list>
#include <memory>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

namespace ddpm {
namespace {

using torch::autograd::variable_list;

// How torch's autograd holds a node: std::shared_ptr in older releases (2.11, the GPU image's), c10::intrusive_ptr
// since pytorch/pytorch#181782 (2.13, CI's). Read off torch::autograd::Edge so the same source builds against both.
template <typename Holder>
struct NodeHolding;
template <>
struct NodeHolding<std::shared_ptr<torch::autograd::Node>> {
  template <typename T>
  using ptr = std::shared_ptr<T>;
  template <typename T>
  static ptr<T> make() { return std::make_shared<T>(); }
};
template <>
struct NodeHolding<c10::intrusive_ptr<torch::autograd::Node>> {
  template <typename T>
  using ptr = c10::intrusive_ptr<T>;
  template <typename T>
  static ptr<T> make() { return c10::make_intrusive<T>(); }
};
using Holding = NodeHolding<std::decay_t<decltype(torch::autograd::Edge::function)>>;
template <typename T>
using NodePtr = Holding::ptr<T>;

// The kernels index each sample as one dense block in the call's memory format (csrc/checks.h). Incoming
// gradients need not be (sum() gives an expanded one): bring them to a dense format, as the Python layer does
// for the forward's operands.
at::MemoryFormat dense_format_of(const at::Tensor& x) {
  if (x.is_contiguous()) return at::MemoryFormat::Contiguous;
  if (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) return at::MemoryFormat::ChannelsLast;
  if (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d)) return at::MemoryFormat::ChannelsLast3d;
  return at::MemoryFormat::Contiguous;
}

// The two incoming gradients of a backward whose forward has two differentiable outputs (the *_backward ops'
// own backward), an undefined one as zeros, both in one dense format; false when neither is defined.
bool dense_grads(const variable_list& grads, at::Tensor& ga, at::Tensor& gb) {
  ga = grads[0];
  gb = grads[1];
  if (!ga.defined() && !gb.defined()) return false;
  if (!ga.defined()) ga = at::zeros_like(gb);
  if (!gb.defined()) gb = at::zeros_like(ga);
  const at::MemoryFormat fmt = dense_format_of(ga);
  ga = ga.contiguous(fmt);
  gb = gb.contiguous(fmt);
  return true;
}

// An operator's typed handle, found by its name in the ddpm_kernels namespace.
template <typename Signature>
struct Op;

template <typename R, typename... Args>
struct Op<R(Args...)> {
  explicit Op(const char* name)
      : handle(c10::Dispatcher::singleton()
                   .findSchemaOrThrow(("ddpm_kernels::" + std::string(name)).c_str(), "")
                   .typed<R(Args...)>()) {}
  R call(Args... args) const { return handle.call(std::forward<Args>(args)...); }

  c10::TypedOperatorHandle<R(Args...)> handle;
};

using CT = const at::Tensor&;
using Str = c10::string_view;
using Tensor2 = std::tuple<at::Tensor, at::Tensor>;
using Tensor3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// The operators, looked up once (on first use: the schemas are registered by another translation unit's
// static initializer). Called through the dispatcher: a call from a backward reaches this file's kernels, so a
// backward that builds a graph records it; a call under AutoDispatchBelowADInplaceOrView reaches the kernel of
// the tensors' device.
struct Operators {
  Op<at::Tensor(CT, CT, CT, CT)> q_sample{"q_sample"};
  Op<Tensor2(CT, CT, CT)> q_sample_backward{"q_sample_backward"};
  Op<Tensor3(CT, CT, CT, CT, CT, Str, Str, double, double)> diffusion_loss{"diffusion_loss"};
  Op<at::Tensor(CT, CT, CT, CT, CT, CT, CT, CT, Str, Str, double, double)> diffusion_loss_backward{
      "diffusion_loss_backward"};
  Op<at::Tensor(CT, CT, CT, int64_t, int64_t)> flow_interpolate{"flow_interpolate"};
  Op<Tensor2(CT, CT, int64_t, int64_t)> flow_interpolate_backward{"flow_interpolate_backward"};
  Op<at::Tensor(CT, CT, CT, CT, int64_t, int64_t, Str, Str)> flow_loss{"flow_loss"};
  Op<at::Tensor(CT, CT, CT, CT, CT, int64_t, int64_t, Str, Str)> flow_loss_backward{"flow_loss_backward"};
};

const Operators& ops() {
  static const Operators operators;
  return operators;
}

using torch::autograd::Node;
using torch::autograd::SavedVariable;

// Forward-mode AD has no formula here: refuse dual tensors rather than drop their tangents.
void check_no_forward_grad(const char* op, std::initializer_list<const at::Tensor*> inputs) {
  for (const at::Tensor* x : inputs) {
    TORCH_CHECK_NOT_IMPLEMENTED(!torch::autograd::isFwGradDefined(*x), "ddpm_kernels::", op,
                                ": forward-mode AD (jvp) is not implemented");
  }
}

struct QSampleBackwardBackwardNode : public torch::autograd::TraceableFunction {
  variable_list apply(variable_list&& grads) override {
    at::Tensor gx, gn;
    if (!task_should_compute_output(0) || !dense_grads(grads, gx, gn)) return {at::Tensor()};
    return {ops().q_sample.call(gx, t.unpack(), gn, table.unpack())};
  }
  std::string name() const override { return "QSampleBackwardBackward0"; }
  void release_variables() override {
    t.reset_data();
    table.reset_data();
  }
  SavedVariable t, table;
};

struct QSampleBackwardNode : public torch::autograd::TraceableFunction {
  variable_list apply(variable_list&& grads) override {
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor()};
    // Through the dispatcher with autograd on: a backward that builds a graph records
    // QSampleBackwardBackward0, so double backward works.
    auto [grad_x_start, grad_noise] = ops().q_sample_backward.call(grads[0], t.unpack(), table.unpack());
    return {task_should_compute_output(0) ? grad_x_start : at::Tensor(),
            task_should_compute_output(1) ? grad_noise : at::Tensor()};
  }
  std::string name() const override { return "QSampleBackward0"; }
  void release_variables() override {
    t.reset_data();
    table.reset_data();
  }
  SavedVariable t, table;
};

struct DiffusionLossBackwardNode : public torch::autograd::TraceableFunction {
  variable_list apply(variable_list&& grads) override {
    TORCH_CHECK(!task_should_compute_output(1) && !task_should_compute_output(2),
                "ddpm_kernels::diffusion_loss gives the gradient w.r.t. model_output only; for x_start or noise "
                "call ddpm_kernels.diffusion_loss, which computes those with the reference");
    if (!task_should_compute_output(0)) return {at::Tensor(), at::Tensor(), at::Tensor()};
    const at::Tensor mo = model_output.unpack(), xs = x_start.unpack(), nz = noise.unpack();
    // The kernel reads the three 0-d gradients as scalars of the losses' dtype (model_output's, or float32 for
    // operands of different dtypes, which the CPU kernels read natively); an unused output's is zero.
    const at::ScalarType loss_dtype =
        mo.scalar_type() == xs.scalar_type() && mo.scalar_type() == nz.scalar_type() ? mo.scalar_type() : at::kFloat;
    for (auto& g : grads) {
      g = g.defined() ? g.to(loss_dtype).reshape({}).contiguous() : at::zeros({}, mo.options().dtype(loss_dtype));
    }
    at::Tensor grad = ops().diffusion_loss_backward.call(grads[0], grads[1], grads[2], mo, xs, nz, t.unpack(),
                                                        table.unpack(),
                                                        parameterization, loss_type, l_simple_weight,
                                                        original_elbo_weight);
    return {grad, at::Tensor(), at::Tensor()};
  }
  std::string name() const override { return "DiffusionLossBackward0"; }
  void release_variables() override {
    model_output.reset_data();
    x_start.reset_data();
    noise.reset_data();
    t.reset_data();
    table.reset_data();
  }
  SavedVariable model_output, x_start, noise, t, table;
  std::string parameterization, loss_type;
  double l_simple_weight = 1.0, original_elbo_weight = 0.0;
};

// The sigma operand of a flow op, kept by its backward.
struct SavedSigma {
  SavedVariable sigma;
  int64_t period = 1, repeat = 1;
  void save(const at::Tensor& s, int64_t p, int64_t r) {
    sigma = SavedVariable(s, false);
    period = p;
    repeat = r;
  }
};

struct FlowInterpolateBackwardBackwardNode : public torch::autograd::TraceableFunction {
  variable_list apply(variable_list&& grads) override {
    at::Tensor gx, gn;
    if (!task_should_compute_output(0) || !dense_grads(grads, gx, gn)) return {at::Tensor()};
    return {ops().flow_interpolate.call(gx, gn, s.sigma.unpack(), s.period, s.repeat)};
  }
  std::string name() const override { return "FlowInterpolateBackwardBackward0"; }
  void release_variables() override { s.sigma.reset_data(); }
  SavedSigma s;
};

struct FlowInterpolateBackwardNode : public torch::autograd::TraceableFunction {
  variable_list apply(variable_list&& grads) override {
    TORCH_CHECK(!task_should_compute_output(2),
                "ddpm_kernels::flow_interpolate gives the gradients w.r.t. x0 and noise only; for sigma call "
                "ddpm_kernels.flow_interpolate, which computes it with the reference");
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor()};
    auto [grad_x0, grad_noise] = ops().flow_interpolate_backward.call(grads[0], s.sigma.unpack(), s.period, s.repeat);
    return {task_should_compute_output(0) ? grad_x0 : at::Tensor(),
            task_should_compute_output(1) ? grad_noise : at::Tensor(), at::Tensor()};
  }
  std::string name() const override { return "FlowInterpolateBackward0"; }
  void release_variables() override { s.sigma.reset_data(); }
  SavedSigma s;
};

struct FlowLossBackwardNode : public torch::autograd::TraceableFunction {
  variable_list apply(variable_list&& grads) override {
    TORCH_CHECK(!task_should_compute_output(1) && !task_should_compute_output(2) && !task_should_compute_output(3),
                "ddpm_kernels::flow_loss gives the gradient w.r.t. model_output only; for x0, noise or sigma call "
                "ddpm_kernels.flow_loss, which computes those with the reference");
    if (!task_should_compute_output(0) || !grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    at::Tensor grad = ops().flow_loss_backward.call(grads[0], model_output.unpack(), x0.unpack(), noise.unpack(),
                                                   s.sigma.unpack(), s.period, s.repeat, weighting, loss_type);
    return {grad, at::Tensor(), at::Tensor(), at::Tensor()};
  }
  std::string name() const override { return "FlowLossBackward0"; }
  void release_variables() override {
    model_output.reset_data();
    x0.reset_data();
    noise.reset_data();
    s.sigma.reset_data();
  }
  SavedVariable model_output, x0, noise;
  SavedSigma s;
  std::string weighting, loss_type;
};

at::Tensor q_sample_autograd(const at::Tensor& x_start, const at::Tensor& t, const at::Tensor& noise,
                             const at::Tensor& table) {
  check_no_forward_grad("q_sample", {&x_start, &noise});
  NodePtr<QSampleBackwardNode> grad_fn;
  if (torch::autograd::compute_requires_grad(x_start, noise)) {
    grad_fn = Holding::make<QSampleBackwardNode>();
    grad_fn->set_next_edges(torch::autograd::collect_next_edges(x_start, noise));
    grad_fn->t = SavedVariable(t, false);
    grad_fn->table = SavedVariable(table, false);
  }
  at::Tensor out;
  {
    // Skip this file's kernels: below them is the plain kernel of the tensors' device.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    out = ops().q_sample.call(x_start, t, noise, table);
  }
  if (grad_fn) torch::autograd::set_history(out, grad_fn);
  return out;
}

std::tuple<at::Tensor, at::Tensor> q_sample_backward_autograd(const at::Tensor& grad, const at::Tensor& t,
                                                              const at::Tensor& table) {
  check_no_forward_grad("q_sample_backward", {&grad});
  NodePtr<QSampleBackwardBackwardNode> grad_fn;
  if (torch::autograd::compute_requires_grad(grad)) {
    grad_fn = Holding::make<QSampleBackwardBackwardNode>();
    grad_fn->set_next_edges(torch::autograd::collect_next_edges(grad));
    grad_fn->t = SavedVariable(t, false);
    grad_fn->table = SavedVariable(table, false);
  }
  at::Tensor grad_x_start, grad_noise;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    // An incoming gradient need not be dense (sum() gives an expanded one); the kernel needs it dense.
    std::tie(grad_x_start, grad_noise) = ops().q_sample_backward.call(grad.contiguous(dense_format_of(grad)), t, table);
  }
  if (grad_fn) torch::autograd::set_history({grad_x_start, grad_noise}, grad_fn);
  return {grad_x_start, grad_noise};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> diffusion_loss_autograd(
    const at::Tensor& model_output, const at::Tensor& x_start, const at::Tensor& noise, const at::Tensor& t,
    const at::Tensor& table, c10::string_view parameterization, c10::string_view loss_type, double l_simple_weight,
    double original_elbo_weight) {
  check_no_forward_grad("diffusion_loss", {&model_output, &x_start, &noise});
  NodePtr<DiffusionLossBackwardNode> grad_fn;
  if (torch::autograd::compute_requires_grad(model_output, x_start, noise)) {
    grad_fn = Holding::make<DiffusionLossBackwardNode>();
    grad_fn->set_next_edges(torch::autograd::collect_next_edges(model_output, x_start, noise));
    grad_fn->model_output = SavedVariable(model_output, false);
    grad_fn->x_start = SavedVariable(x_start, false);
    grad_fn->noise = SavedVariable(noise, false);
    grad_fn->t = SavedVariable(t, false);
    grad_fn->table = SavedVariable(table, false);
    grad_fn->parameterization = std::string(parameterization);
    grad_fn->loss_type = std::string(loss_type);
    grad_fn->l_simple_weight = l_simple_weight;
    grad_fn->original_elbo_weight = original_elbo_weight;
  }
  at::Tensor loss, loss_simple, loss_vlb;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    std::tie(loss, loss_simple, loss_vlb) = ops().diffusion_loss.call(
        model_output, x_start, noise, t, table, parameterization, loss_type, l_simple_weight, original_elbo_weight);
  }
  if (grad_fn) torch::autograd::set_history({loss, loss_simple, loss_vlb}, grad_fn);
  return {loss, loss_simple, loss_vlb};
}

at::Tensor flow_interpolate_autograd(const at::Tensor& x0, const at::Tensor& noise, const at::Tensor& sigma,
                                     int64_t sigma_period, int64_t sigma_repeat) {
  check_no_forward_grad("flow_interpolate", {&x0, &noise, &sigma});
  NodePtr<FlowInterpolateBackwardNode> grad_fn;
  if (torch::autograd::compute_requires_grad(x0, noise, sigma)) {
    grad_fn = Holding::make<FlowInterpolateBackwardNode>();
    grad_fn->set_next_edges(torch::autograd::collect_next_edges(x0, noise, sigma));
    grad_fn->s.save(sigma, sigma_period, sigma_repeat);
  }
  at::Tensor out;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    out = ops().flow_interpolate.call(x0, noise, sigma, sigma_period, sigma_repeat);
  }
  if (grad_fn) torch::autograd::set_history(out, grad_fn);
  return out;
}

std::tuple<at::Tensor, at::Tensor> flow_interpolate_backward_autograd(const at::Tensor& grad, const at::Tensor& sigma,
                                                                      int64_t sigma_period, int64_t sigma_repeat) {
  check_no_forward_grad("flow_interpolate_backward", {&grad});
  TORCH_CHECK(!(at::GradMode::is_enabled() && sigma.requires_grad()),
              "ddpm_kernels::flow_interpolate_backward gives no gradient w.r.t. sigma");
  NodePtr<FlowInterpolateBackwardBackwardNode> grad_fn;
  if (torch::autograd::compute_requires_grad(grad)) {
    grad_fn = Holding::make<FlowInterpolateBackwardBackwardNode>();
    grad_fn->set_next_edges(torch::autograd::collect_next_edges(grad));
    grad_fn->s.save(sigma, sigma_period, sigma_repeat);
  }
  at::Tensor grad_x0, grad_noise;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    std::tie(grad_x0, grad_noise) =
        ops().flow_interpolate_backward.call(grad.contiguous(dense_format_of(grad)), sigma, sigma_period, sigma_repeat);
  }
  if (grad_fn) torch::autograd::set_history({grad_x0, grad_noise}, grad_fn);
  return {grad_x0, grad_noise};
}

at::Tensor flow_loss_autograd(const at::Tensor& model_output, const at::Tensor& x0, const at::Tensor& noise,
                              const at::Tensor& sigma, int64_t sigma_period, int64_t sigma_repeat,
                              c10::string_view weighting, c10::string_view loss_type) {
  check_no_forward_grad("flow_loss", {&model_output, &x0, &noise, &sigma});
  NodePtr<FlowLossBackwardNode> grad_fn;
  if (torch::autograd::compute_requires_grad(model_output, x0, noise, sigma)) {
    grad_fn = Holding::make<FlowLossBackwardNode>();
    grad_fn->set_next_edges(torch::autograd::collect_next_edges(model_output, x0, noise, sigma));
    grad_fn->model_output = SavedVariable(model_output, false);
    grad_fn->x0 = SavedVariable(x0, false);
    grad_fn->noise = SavedVariable(noise, false);
    grad_fn->s.save(sigma, sigma_period, sigma_repeat);
    grad_fn->weighting = std::string(weighting);
    grad_fn->loss_type = std::string(loss_type);
  }
  at::Tensor loss;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    loss = ops().flow_loss.call(model_output, x0, noise, sigma, sigma_period, sigma_repeat, weighting, loss_type);
  }
  if (grad_fn) torch::autograd::set_history(loss, grad_fn);
  return loss;
}

}  // namespace
}  // namespace ddpm

// Autograd (not AutogradCPU/AutogradCUDA): one kernel for every device whose backend kernel the dispatcher finds.
TORCH_LIBRARY_IMPL(ddpm_kernels, Autograd, m) {
  m.impl("q_sample", &ddpm::q_sample_autograd);
  m.impl("q_sample_backward", &ddpm::q_sample_backward_autograd);
  m.impl("diffusion_loss", &ddpm::diffusion_loss_autograd);
  m.impl("flow_interpolate", &ddpm::flow_interpolate_autograd);
  m.impl("flow_interpolate_backward", &ddpm::flow_interpolate_backward_autograd);
  m.impl("flow_loss", &ddpm::flow_loss_autograd);
}
