// The host side of solver_step (csrc/solver.h), shared by the CPU and CUDA backends as csrc/host_ops.h: argument
// checks and the kernel layout of the state tensors (its functional form: `Functional` in csrc/host_ops.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <optional>
#include <utility>
#include <vector>

#include "checks.h"
#include "solver.h"

namespace ddpm {

// Whether the kernels read ring `h` as it is: every slot a dense block in `fmt`, `slot_numel` elements apart.
// Read from the sizes and strides (a view of slot 0 would cost a tensor per call): the slot's dims in storage
// order, innermost first, each `slot_numel`-dense, ignoring size-1 dims as is_contiguous does.
inline bool ring_in_format(const at::Tensor& h, at::MemoryFormat fmt, int64_t slot_numel) {
  if (h.size(0) > 1 && h.stride(0) != slot_numel) return false;
  const at::IntArrayRef sizes = h.sizes().slice(1), strides = h.strides().slice(1);
  const int64_t dim = static_cast<int64_t>(sizes.size());
  for (const int64_t size : sizes)
    if (size == 0) return true;
  // channels_last: (C, W, H, B) innermost first; channels_last_3d: (C, W, H, D, B); else the last dim first
  const bool last = fmt == at::MemoryFormat::ChannelsLast || fmt == at::MemoryFormat::ChannelsLast3d;
  int64_t expected = 1;
  for (int64_t k = 0; k < dim; ++k) {
    const int64_t d = !last ? dim - 1 - k : k == 0 ? 1 : k == dim - 1 ? 0 : dim - k;
    if (sizes[d] != 1 && strides[d] != expected) return false;
    expected *= sizes[d];
  }
  return true;
}

// An uninitialized ring like `h` whose slots are dense blocks in `fmt`, one after another.
inline at::Tensor empty_ring(const at::Tensor& h, at::MemoryFormat fmt) {
  if (fmt == at::MemoryFormat::Contiguous) return at::empty(h.sizes(), h.options());
  // (H, B, C, *spatial) stored as (H, B, *spatial, C)
  const int64_t dim = h.dim();
  std::vector<int64_t> sizes{h.size(0), h.size(1)}, perm{0, 1, dim - 1};
  for (int64_t d = 3; d < dim; ++d) sizes.push_back(h.size(d));
  sizes.push_back(h.size(2));
  for (int64_t d = 2; d < dim - 1; ++d) perm.push_back(d);
  return at::empty(sizes, h.options()).permute(perm);
}

template <typename K>
void solver_step_out_kernel(const at::Tensor& sample, const at::Tensor& model_output,
                            const std::optional<at::Tensor>& uncond, const std::optional<at::Tensor>& guidance,
                            const at::Tensor& coefficients, const at::Tensor& step_index,
                            const std::optional<at::Tensor>& history, const std::optional<at::Tensor>& last_sample,
                            bool stochastic, std::optional<double> clip_range, double guidance_rescale,
                            const std::optional<at::Tensor>& noise, std::optional<at::Generator> generator,
                            int64_t sample_offset, const at::Tensor& out) {
  check_batch(sample);
  check_sample_offset(sample_offset);
  const at::MemoryFormat data_format = dense_format(sample, "sample");
  // out and the state: the result dtype of the operands (float32 for a mix, read by the CPU backend natively)
  const at::ScalarType type =
      check_table_step<K>("solver_step", sample, model_output, uncond, guidance, guidance_rescale, noise, out);
  TORCH_CHECK(!clip_range.has_value() || *clip_range > 0, "ddpm_kernels: clip_range must be > 0, got ",
              clip_range.value_or(0.0));
  int64_t slots = 0;
  if (history.has_value()) {
    const at::Tensor& h = *history;
    TORCH_CHECK(h.scalar_type() == type && h.device() == sample.device() &&
                    h.dim() == sample.dim() + 1 && h.size(0) >= 1 && h.sizes().slice(1) == sample.sizes(),
                "ddpm_kernels: history must be (H, ", sample.sizes(), ") with H >= 1 of ", type,
                " on ", sample.device(), ", got ", h.scalar_type(), " ", h.sizes(), " on ", h.device());
    slots = h.size(0);
  }
  if (last_sample.has_value()) {
    TORCH_CHECK(last_sample->sizes() == sample.sizes() && last_sample->scalar_type() == type &&
                    last_sample->device() == sample.device(),
                "ddpm_kernels: last_sample must be like sample (", sample.sizes(), " ", type, " on ",
                sample.device(), "), got ", last_sample->sizes(), " ", last_sample->scalar_type(), " on ",
                last_sample->device());
  }
  TORCH_CHECK(coefficients.is_floating_point() && coefficients.dim() == 2 && coefficients.size(0) >= 1 &&
                  coefficients.size(1) == 11 + 2 * slots && coefficients.is_contiguous() &&
                  coefficients.device() == sample.device(),
              "ddpm_kernels: coefficients must be a contiguous float (steps, ", 11 + 2 * slots, ") table on ",
              sample.device(), " for ", slots, " history slots, got ", coefficients.scalar_type(), " ",
              coefficients.sizes(), " on ", coefficients.device());
  check_timesteps("step_index", step_index, sample);
  const bool given = stochastic && noise.has_value();

  // In-kernel noise is indexed by each element's row-major position (docs/design.md, "Noise streams") while the
  // kernels walk storage order: a drawing call on channels_last data runs on contiguous copies, whose state and
  // result are written back. State tensors in another layout than the kernel's go through copies likewise.
  const at::MemoryFormat fmt = stochastic && !given ? at::MemoryFormat::Contiguous : data_format;
  const at::Tensor x = sample.contiguous(fmt), y = model_output.contiguous(fmt);
  const std::optional<at::Tensor> u = uncond.has_value() ? std::optional<at::Tensor>(uncond->contiguous(fmt))
                                                         : std::nullopt;
  at::Tensor ring, last;
  if (history.has_value()) {
    ring = *history;
    if (!ring_in_format(ring, fmt, sample.numel())) {
      ring = empty_ring(*history, fmt);
      ring.copy_(*history);
    }
  }
  if (last_sample.has_value()) last = last_sample->contiguous(fmt);
  const at::Tensor target = out.is_contiguous(fmt) ? out : at::empty_like(x, x.options().dtype(type));
  const at::Tensor table =
      coefficients.scalar_type() == at::kFloat || coefficients.scalar_type() == at::kDouble
          ? coefficients
          : coefficients.to(at::kDouble);  // float16 / bfloat16 tables: exact in float64
  K::solver_step(SolverStepCall{x, y, u.has_value() ? &*u : nullptr, guidance.has_value() ? &*guidance : nullptr,
                                table, step_index, history.has_value() ? &ring : nullptr,
                                last_sample.has_value() ? &last : nullptr, stochastic, clip_range, guidance_rescale,
                                given ? &*noise : nullptr, std::move(generator), target, sample_offset});
  if (history.has_value() && !ring.is_same(*history)) history->copy_(ring);
  if (last_sample.has_value() && !last.is_same(*last_sample)) last_sample->copy_(last);
  if (!target.is_same(out)) out.copy_(target);
}

}  // namespace ddpm
