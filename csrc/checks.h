// Host-side argument checks shared by the CPU and CUDA kernels. The public Python layer validates user
// input; these catch misuse of the raw torch.ops.ddpm_kernels.* operators.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <initializer_list>
#include <optional>
#include <string>
#include <type_traits>

#include "coefficients.h"
#include "flow.h"
#include "sampler_coefficients.h"

namespace ddpm {

inline Param parse_param(const std::string& p) {
  if (p == "eps") return Param::kEps;
  if (p == "x0") return Param::kX0;
  if (p == "v") return Param::kV;
  TORCH_CHECK_VALUE(false, "ddpm_kernels: parameterization must be 'eps', 'x0' or 'v', got '", p, "'");
}

inline bool parse_l1(const std::string& loss_type) {
  TORCH_CHECK_VALUE(loss_type == "l1" || loss_type == "l2",
                    "ddpm_kernels: loss_type must be 'l1' or 'l2', got '", loss_type, "'");
  return loss_type == "l1";
}

// Layouts. The kernels index storage order, sample b at [b * N, (b + 1) * N): they run on any layout in which
// every sample is one dense block, as long as all tensors of a call share it. These are the contiguous,
// channels_last (4-D) and channels_last_3d (5-D) formats; outputs are allocated in the first data tensor's
// format (empty_like preserves a dense tensor's strides). The Python layer brings every operand to one format.
inline at::MemoryFormat dense_format(const at::Tensor& x, const char* name) {
  if (x.is_contiguous()) return at::MemoryFormat::Contiguous;
  if (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) return at::MemoryFormat::ChannelsLast;
  if (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d)) return at::MemoryFormat::ChannelsLast3d;
  TORCH_CHECK(false, "ddpm_kernels: ", name, " must be contiguous, channels_last or channels_last_3d, got strides ",
              x.strides());
}

// The data tensors of one call: same shape, dtype and device as `ref`, and in its memory format; t int64 of
// shape (B,); the table (K, T) contiguous, float64 for float64 data else float32.
inline void check_layout(const char* name, const at::Tensor& x, const at::Tensor& ref) {
  TORCH_CHECK(x.sizes() == ref.sizes(), "ddpm_kernels: ", name, " has shape ", x.sizes(), ", expected ", ref.sizes());
  TORCH_CHECK(x.device() == ref.device(), "ddpm_kernels: ", name, " is on ", x.device(), ", expected ", ref.device());
  const at::MemoryFormat format = dense_format(ref, "data");
  TORCH_CHECK(x.is_contiguous(format), "ddpm_kernels: ", name, " must be in the memory format of the data (",
              format, "), got strides ", x.strides());
}

inline void check_data(const char* name, const at::Tensor& x, const at::Tensor& ref) {
  TORCH_CHECK(x.sizes() == ref.sizes(), "ddpm_kernels: ", name, " has shape ", x.sizes(), ", expected ", ref.sizes());
  TORCH_CHECK(x.scalar_type() == ref.scalar_type(), "ddpm_kernels: ", name, " has dtype ", x.scalar_type(),
              ", expected ", ref.scalar_type());
  check_layout(name, x, ref);
}

// ------------------------------------------------------------------------------------------ mixed dtypes
// Whether backend K's kernels read float operands of different dtypes, each in its own, for the ops that call
// check_operand (docs/design.md, "Mixed precision"): specialised true by the CPU and CUDA backends
// (cpu/registration.cpp, cuda/registration.cpp).
template <typename K>
struct ReadsMixed : std::false_type {};

inline bool mixable(at::ScalarType st) { return st == at::kFloat || st == at::kHalf || st == at::kBFloat16; }

// An operand of the call whose data is `ref`: as check_data, except that on a backend reading mixed dtypes
// float32, float16 and bfloat16 operands go together (computed in float32).
template <typename K>
void check_operand(const char* name, const at::Tensor& x, const at::Tensor& ref) {
  if (x.scalar_type() == ref.scalar_type()) return check_data(name, x, ref);
  TORCH_CHECK(ReadsMixed<K>::value, "ddpm_kernels: ", name, " has dtype ", x.scalar_type(), ", expected ",
              ref.scalar_type(), " (this backend reads every operand in the data's dtype)");
  TORCH_CHECK(mixable(x.scalar_type()) && mixable(ref.scalar_type()), "ddpm_kernels: ", name, " has dtype ",
              x.scalar_type(), ", expected ", ref.scalar_type(),
              " (operands of different dtypes are read natively as float32, float16 and bfloat16 only)");
  check_layout(name, x, ref);
}

// An operand of result_type: a tensor, or an optional one (nullptr when absent).
inline const at::Tensor* operand_ptr(const at::Tensor& t) { return &t; }
inline const at::Tensor* operand_ptr(const std::optional<at::Tensor>& t) { return t.has_value() ? &*t : nullptr; }

// The dtype of a call's outputs: its operands' one dtype, float32 when they differ (after check_operand).
inline at::ScalarType result_type(std::initializer_list<const at::Tensor*> operands) {
  const at::Tensor* first = nullptr;
  for (const at::Tensor* t : operands) {
    if (t == nullptr) continue;
    if (first == nullptr) first = t;
    else if (t->scalar_type() != first->scalar_type()) return at::kFloat;
  }
  return first->scalar_type();
}

// An output of the call: `ref`'s shape, device and layout, in dtype `type`.
inline void check_output(const char* name, const at::Tensor& out, const at::Tensor& ref, at::ScalarType type) {
  TORCH_CHECK(out.scalar_type() == type, "ddpm_kernels: ", name, " has dtype ", out.scalar_type(), ", expected ",
              type, " (the result dtype of the operands)");
  check_layout(name, out, ref);
}

// The first data tensor: a batch dimension and a kernel dtype.
// The global index of the batch's first sample in the noise stream: one 32-bit counter word.
inline void check_sample_offset(int64_t sample_offset) {
  TORCH_CHECK(sample_offset >= 0 && sample_offset < (int64_t(1) << 32),
              "ddpm_kernels: sample_offset must be in [0, 2**32), got ", sample_offset);
}

inline void check_batch(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 1, "ddpm_kernels: data must have a batch dimension");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble || x.scalar_type() == at::kHalf ||
                  x.scalar_type() == at::kBFloat16,
              "ddpm_kernels: unsupported dtype ", x.scalar_type());
}

// A per-sample timestep tensor (t, t_prev): int64 of shape (B,), contiguous on the data's device.
inline void check_timesteps(const char* name, const at::Tensor& ts, const at::Tensor& x) {
  TORCH_CHECK(ts.scalar_type() == at::kLong && ts.dim() == 1 && ts.size(0) == x.size(0), "ddpm_kernels: ", name,
              " must be int64 of shape (", x.size(0), ",), got ", ts.scalar_type(), " ", ts.sizes());
  TORCH_CHECK(ts.device() == x.device() && ts.is_contiguous(), "ddpm_kernels: ", name, " must be contiguous on ",
              x.device());
}

inline void check_common(const at::Tensor& x, const at::Tensor& t, const at::Tensor& table) {
  check_batch(x);
  dense_format(x, "data");
  check_timesteps("t", t, x);
  const auto want = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(table.scalar_type() == want, "ddpm_kernels: table must be ", want, " for ", x.scalar_type(),
              " data, got ", table.scalar_type());
  TORCH_CHECK(table.dim() == 2 && table.size(0) >= kNumRows && table.size(1) >= 1 && table.is_contiguous(),
              "ddpm_kernels: table must be the contiguous (", int(kNumRows), ", T) schedule table, got ",
              table.sizes());
  TORCH_CHECK(table.device() == x.device(), "ddpm_kernels: table is on ", table.device(), ", expected ", x.device());
}

inline Variance parse_variance(const std::string& v) {
  if (v == "fixed_small" || v == "fixed_small_log") return Variance::kFixedSmall;
  if (v == "fixed_large" || v == "fixed_large_log") return Variance::kFixedLarge;
  if (v == "learned") return Variance::kLearned;
  if (v == "learned_range") return Variance::kLearnedRange;
  TORCH_CHECK_VALUE(false, "ddpm_kernels: variance_type must be one of fixed_small, fixed_small_log, fixed_large, ",
                    "fixed_large_log, learned, learned_range, got '", v, "'");
}

inline bool is_learned(Variance v) { return v == Variance::kLearned || v == Variance::kLearnedRange; }

// The sampler steps: x_t as check_common, t and t_prev int64 of shape (B,), the float64 (K, T) table, and
// model_output like x_t (check_operand), or (B, 2C, ...) for x_t of (B, C, ...) with a learned variance.
template <typename K>
void check_sampler(const at::Tensor& x, const at::Tensor& t, const at::Tensor& t_prev,
                   const at::Tensor& model_output, const at::Tensor& table64, bool learned) {
  check_batch(x);
  // a learned variance reads model_output's channel halves by contiguous index
  if (learned) {
    TORCH_CHECK(x.is_contiguous(), "ddpm_kernels: x_t must be contiguous with a learned variance");
  } else {
    dense_format(x, "x_t");
  }
  check_timesteps("t", t, x);
  check_timesteps("t_prev", t_prev, x);
  TORCH_CHECK(table64.scalar_type() == at::kDouble && table64.dim() == 2 && table64.size(0) >= kNumRows &&
                  table64.size(1) >= 1 && table64.is_contiguous(),
              "ddpm_kernels: table64 must be the contiguous float64 (", int(kNumRows), ", T) schedule table, got ",
              table64.scalar_type(), " ", table64.sizes());
  TORCH_CHECK(table64.device() == x.device(), "ddpm_kernels: table64 is on ", table64.device(), ", expected ",
              x.device());
  if (!learned) {
    check_operand<K>("model_output", model_output, x);
    return;
  }
  TORCH_CHECK(x.dim() >= 2, "ddpm_kernels: a learned variance needs x_t with a channel dimension");
  auto want = x.sizes().vec();
  want[1] *= 2;
  TORCH_CHECK(model_output.sizes() == at::IntArrayRef(want), "ddpm_kernels: model_output has shape ",
              model_output.sizes(), ", expected ", at::IntArrayRef(want), " (prediction and variance channels)");
  const bool dtype_ok = model_output.scalar_type() == x.scalar_type() ||
                        (ReadsMixed<K>::value && mixable(model_output.scalar_type()) && mixable(x.scalar_type()));
  TORCH_CHECK(dtype_ok && model_output.device() == x.device() && model_output.is_contiguous(),
              "ddpm_kernels: model_output must be contiguous, of x_t's dtype (or, on a backend reading mixed dtypes, "
              "float32, float16 or bfloat16 with such data) and device");
}

// ------------------------------------------------------------------------------------------ flow matching
// The dtype the kernels compute in, which flow-matching sigmas and guidance scales come in.
inline at::ScalarType compute_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline FlowWeighting parse_weighting(const std::string& w) {
  if (w == "none") return FlowWeighting::kNone;
  if (w == "sigma_sqrt") return FlowWeighting::kSigmaSqrt;
  if (w == "cosmap") return FlowWeighting::kCosmap;
  TORCH_CHECK_VALUE(false, "ddpm_kernels: weighting must be 'none', 'sigma_sqrt' or 'cosmap', got '", w, "'");
}

// A sigma operand (ddpm_kernels._spec.SigmaOperand): the contiguous (B * period,) tensor in the compute dtype,
// read at flat[b * period + (off / repeat) % period] for element offset off of sample b: never outside it.
inline void check_sigma(const char* name, const at::Tensor& sigma, int64_t period, int64_t repeat,
                        const at::Tensor& x) {
  TORCH_CHECK(period >= 1 && repeat >= 1, "ddpm_kernels: ", name, " period and repeat must be >= 1, got ", period,
              ", ", repeat);
  TORCH_CHECK(sigma.scalar_type() == compute_type(x), "ddpm_kernels: ", name, " must be ", compute_type(x), " for ",
              x.scalar_type(), " data, got ", sigma.scalar_type());
  TORCH_CHECK(sigma.device() == x.device(), "ddpm_kernels: ", name, " is on ", sigma.device(), ", expected ",
              x.device());
  TORCH_CHECK(sigma.is_contiguous() && sigma.numel() == x.size(0) * period, "ddpm_kernels: ", name,
              " must be a contiguous tensor of B * period = ", x.size(0) * period, " elements, got ", sigma.sizes());
}

// A per-sample float vector of the compute dtype (guidance scales), contiguous (B,).
inline void check_per_sample(const char* name, const at::Tensor& v, const at::Tensor& x) {
  TORCH_CHECK(v.scalar_type() == compute_type(x) && v.dim() == 1 && v.size(0) == x.size(0) && v.is_contiguous() &&
                  v.device() == x.device(),
              "ddpm_kernels: ", name, " must be a contiguous ", compute_type(x), " tensor of shape (", x.size(0),
              ",) on ", x.device(), ", got ", v.scalar_type(), " ", v.sizes(), " on ", v.device());
}

// The guidance arguments of a step (`op` names it): uncond and guidance together (a guided step) or neither;
// uncond like `like` (the model output; nullptr: uncond is an operand the caller checked, check_operand),
// guidance per sample of `x` in the compute dtype; guidance_rescale in [0, 1], and only for a guided step.
inline void check_guidance(const char* op, const std::optional<at::Tensor>& uncond,
                           const std::optional<at::Tensor>& guidance, double guidance_rescale, const at::Tensor* like,
                           const at::Tensor& x) {
  TORCH_CHECK(uncond.has_value() == guidance.has_value(), "ddpm_kernels: ", op,
              " takes uncond and guidance together (a guided step) or neither");
  if (uncond.has_value()) {
    if (like != nullptr) check_data("uncond", *uncond, *like);
    check_per_sample("guidance", *guidance, x);
  }
  TORCH_CHECK(guidance_rescale >= 0 && guidance_rescale <= 1, "ddpm_kernels: guidance_rescale must be in [0, 1], got ",
              guidance_rescale);
  TORCH_CHECK(guidance_rescale == 0 || uncond.has_value(),
              "ddpm_kernels: guidance_rescale needs a guided step (uncond and guidance)");
}

// The operands of a step on a sigma or solver table (the data, model output, uncond and noise, each of its own
// dtype on a backend reading mixed dtypes; a noise the step does not read counts in the result dtype too, as in
// the reference), its guidance (check_guidance) and its out in the result dtype, which it returns.
template <typename K>
at::ScalarType check_table_step(const char* op, const at::Tensor& sample, const at::Tensor& model_output,
                                const std::optional<at::Tensor>& uncond, const std::optional<at::Tensor>& guidance,
                                double guidance_rescale, const std::optional<at::Tensor>& noise,
                                const at::Tensor& out) {
  check_operand<K>("model_output", model_output, sample);
  if (uncond.has_value()) check_operand<K>("uncond", *uncond, sample);
  if (noise.has_value()) check_operand<K>("noise", *noise, sample);
  check_guidance(op, uncond, guidance, guidance_rescale, nullptr, sample);
  const at::ScalarType type = result_type({&sample, &model_output, operand_ptr(uncond), operand_ptr(noise)});
  check_output("out", out, sample, type);
  return type;
}

// (B, 1, ..., 1) with x's number of dims: the shape of var / log_var.
inline std::vector<int64_t> per_sample_shape(const at::Tensor& x) {
  std::vector<int64_t> shape(x.dim(), 1);
  shape[0] = x.size(0);
  return shape;
}

}  // namespace ddpm
