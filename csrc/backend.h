// What a backend supplies to csrc/host_ops.h: static functions of one struct Kernels, each called after the
// checks with every output allocated. A call's tensors and options come as one struct of the family
// (PairCall, PosteriorCall, SamplerCall, LossCall, Flow*Call: see the family headers); the data has at least one element
// except for posterior and sampler_step (posterior still writes var / log_var for B > 0). The loss
// gradients are one-element tensors of model_output's dtype and device.
//
// Declared once for every backend: a backend includes this file inside its own namespace (after the family
// headers), so it has no include guard.
struct Kernels {
  static void pair(const PairCall& call);
  static void posterior(const PosteriorCall& call);
  static void sampler_step(const SamplerCall& call);
  static void diffusion_loss(const LossCall& call, const at::Tensor& loss, const at::Tensor& loss_simple,
                             const at::Tensor& loss_vlb);
  static void diffusion_loss_backward(const LossCall& call, const at::Tensor& grad_loss,
                                      const at::Tensor& grad_loss_simple, const at::Tensor& grad_loss_vlb,
                                      const at::Tensor& grad);
  // The flow-matching family (csrc/flow.h). flow_step is also called for empty data (it still draws its
  // noise key, as p_sample); the loss is a 0-d tensor and its incoming gradient a 0-d tensor of the compute
  // dtype (float64 for float64 data, else float32).
  static void flow_interpolate(const FlowInterpolateCall& call);
  static void flow_step(const FlowStepCall& call);
  static void flow_loss(const FlowLossCall& call, const at::Tensor& loss);
  static void flow_loss_backward(const FlowLossCall& call, const at::Tensor& grad_loss, const at::Tensor& grad);
  // The multistep-solver family (csrc/solver.h); also called for empty data (it still draws its noise key).
  static void solver_step(const SolverStepCall& call);
};
