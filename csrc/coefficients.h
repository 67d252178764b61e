// The packed schedule table that every family gathers its per-sample coefficients from, and what the
// families share on top of it: the parameterizations and the x0 prediction from a model output.
//
// The table is the (K, T) buffer of DiffusionSchedule.table(dtype): float32 for float16/bfloat16/float32
// data, float64 for float64 data; rows are named by TABLE_NAMES in ddpm_kernels/schedule.py. Each formula
// exists once in C++, in the family headers (pair_ops.h, posterior.h, sampler_coefficients.h, loss.h); the
// Python reference, ddpm_kernels/reference.py, is the specification both backends are tested against.
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>
#include <cstdint>

#include "family.h"

namespace ddpm {

// Row order of the packed table; must match TABLE_NAMES in ddpm_kernels/schedule.py.
enum Row : int {
  kBetas = 0,
  kAlphasCumprod = 1,
  kAlphasCumprodPrev = 2,
  kSqrtAlphasCumprod = 3,
  kSqrtOneMinusAlphasCumprod = 4,
  kLogOneMinusAlphasCumprod = 5,
  kSqrtRecipAlphasCumprod = 6,
  kSqrtRecipm1AlphasCumprod = 7,
  kPosteriorVariance = 8,
  kPosteriorLogVarianceClipped = 9,
  kPosteriorMeanCoef1 = 10,
  kPosteriorMeanCoef2 = 11,
  kLvlbWeightsEps = 12,
  kLvlbWeightsX0 = 13,
  kLvlbWeightsV = 14,
  kNumRows = 15,
};

enum class Param : int { kEps = 0, kX0 = 1, kV = 2 };

// table[row, t], or NaN when t is outside [0, T): an out-of-range t never reads outside the table.
template <typename acc_t, typename table_t>
DDPM_HD acc_t gather(const table_t* table, int64_t T, int row, int64_t t) {
  return (t >= 0 && t < T) ? static_cast<acc_t>(table[row * T + t]) : static_cast<acc_t>(NAN);
}

// A call's timesteps and schedule table, the per-sample input of every family: sample b reads column t[b].
template <typename table_t>
struct Timesteps {
  const int64_t* t;
  const table_t* table;
  int64_t T;

  static Timesteps of(const at::Tensor& t, const at::Tensor& table) {
    return {t.const_data_ptr<int64_t>(), table.const_data_ptr<table_t>(), table.size(1)};
  }
  DDPM_HD table_t at(int row, int64_t b) const { return gather<table_t>(table, T, row, t[b]); }
};

// x0 predicted from a model output: x0_x * x + x0_mo * mo (eps and v parameterizations, signs folded into
// the coefficients), or the output itself (x0).
template <typename V, typename acc_t, typename ParamT>
DDPM_LANE V predict_x0(ParamT param, acc_t x0_x, acc_t x0_mo, const V& x, const V& mo) {
  if (param == Param::kX0) return mo;
  return madd(splat<V>(x0_x), x, splat<V>(x0_mo) * mo);
}

}  // namespace ddpm
