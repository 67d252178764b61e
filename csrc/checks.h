// Host-side argument checks shared by the CPU and CUDA kernels. The public Python layer validates user
// input; these catch misuse of the raw torch.ops.ddpm_kernels.* operators.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>

#include "coefficients.h"

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

// The data tensors of one call: same shape, dtype and device as `ref`, and contiguous (the Python layer
// makes them so); t int64 of shape (B,); the table (K, T) contiguous, float64 for float64 data else float32.
inline void check_data(const char* name, const at::Tensor& x, const at::Tensor& ref) {
  TORCH_CHECK(x.sizes() == ref.sizes(), "ddpm_kernels: ", name, " has shape ", x.sizes(), ", expected ", ref.sizes());
  TORCH_CHECK(x.scalar_type() == ref.scalar_type(), "ddpm_kernels: ", name, " has dtype ", x.scalar_type(),
              ", expected ", ref.scalar_type());
  TORCH_CHECK(x.device() == ref.device(), "ddpm_kernels: ", name, " is on ", x.device(), ", expected ", ref.device());
  TORCH_CHECK(x.is_contiguous(), "ddpm_kernels: ", name, " must be contiguous");
}

inline void check_common(const at::Tensor& x, const at::Tensor& t, const at::Tensor& table) {
  TORCH_CHECK(x.dim() >= 1, "ddpm_kernels: data must have a batch dimension");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble || x.scalar_type() == at::kHalf ||
                  x.scalar_type() == at::kBFloat16,
              "ddpm_kernels: unsupported dtype ", x.scalar_type());
  TORCH_CHECK(x.is_contiguous(), "ddpm_kernels: data must be contiguous");
  TORCH_CHECK(t.scalar_type() == at::kLong && t.dim() == 1 && t.size(0) == x.size(0),
              "ddpm_kernels: t must be int64 of shape (", x.size(0), ",), got ", t.scalar_type(), " ", t.sizes());
  TORCH_CHECK(t.device() == x.device() && t.is_contiguous(), "ddpm_kernels: t must be contiguous on ", x.device());
  const auto want = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(table.scalar_type() == want, "ddpm_kernels: table must be ", want, " for ", x.scalar_type(),
              " data, got ", table.scalar_type());
  TORCH_CHECK(table.dim() == 2 && table.size(0) >= kNumRows && table.size(1) >= 1 && table.is_contiguous(),
              "ddpm_kernels: table must be the contiguous (", int(kNumRows), ", T) schedule table, got ",
              table.sizes());
  TORCH_CHECK(table.device() == x.device(), "ddpm_kernels: table is on ", table.device(), ", expected ", x.device());
}

// (B, 1, ..., 1) with x's number of dims: the shape of var / log_var.
inline std::vector<int64_t> per_sample_shape(const at::Tensor& x) {
  std::vector<int64_t> shape(x.dim(), 1);
  shape[0] = x.size(0);
  return shape;
}

}  // namespace ddpm
