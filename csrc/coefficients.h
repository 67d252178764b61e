// Per-sample coefficients of every op, gathered from the packed schedule table by t.
//
// Shared by the CPU and CUDA kernels so each formula exists once in C++ (the Python reference,
// ddpm_kernels/reference.py, is the specification both are tested against). The table is the (K, T)
// buffer of DiffusionSchedule.table(dtype): float32 for float16/bfloat16/float32 data, float64 for
// float64 data; rows are named by TABLE_NAMES in ddpm_kernels/schedule.py.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__)
#define DDPM_HD __host__ __device__ __forceinline__
#else
#define DDPM_HD inline
#endif

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

// out = a * x + b * y: the two-operand ops (q_sample, predict_start_from_noise, get_v, ...).
template <typename acc_t>
struct Pair {
  acc_t a, b;
};

enum class PairOp : int {
  kQSample = 0,                 // (x_start, noise):  sqrt(ab) x_start + sqrt(1 - ab) noise
  kPredictStartFromNoise = 1,   // (x_t, noise):      sqrt(1/ab) x_t - sqrt(1/ab - 1) noise
  kPredictNoiseFromStart = 2,   // (x_t, x0):         (sqrt(1/ab) x_t - x0) / sqrt(1/ab - 1)
  kGetV = 3,                    // (x_start, noise):  sqrt(ab) noise - sqrt(1 - ab) x_start
  kPredictStartFromZAndV = 4,   // (x_t, v):          sqrt(ab) x_t - sqrt(1 - ab) v
  kPredictEpsFromZAndV = 5,     // (x_t, v):          sqrt(ab) v + sqrt(1 - ab) x_t
};

template <typename acc_t, typename table_t>
DDPM_HD Pair<acc_t> pair_coefficients(PairOp op, const table_t* table, int64_t T, int64_t t) {
  switch (op) {
    case PairOp::kQSample:
      return {gather<acc_t>(table, T, kSqrtAlphasCumprod, t), gather<acc_t>(table, T, kSqrtOneMinusAlphasCumprod, t)};
    case PairOp::kPredictStartFromNoise:
      return {gather<acc_t>(table, T, kSqrtRecipAlphasCumprod, t), -gather<acc_t>(table, T, kSqrtRecipm1AlphasCumprod, t)};
    case PairOp::kPredictNoiseFromStart: {
      const acc_t inv_b = acc_t(1) / gather<acc_t>(table, T, kSqrtRecipm1AlphasCumprod, t);
      return {gather<acc_t>(table, T, kSqrtRecipAlphasCumprod, t) * inv_b, -inv_b};
    }
    case PairOp::kGetV:
      return {-gather<acc_t>(table, T, kSqrtOneMinusAlphasCumprod, t), gather<acc_t>(table, T, kSqrtAlphasCumprod, t)};
    case PairOp::kPredictStartFromZAndV:
      return {gather<acc_t>(table, T, kSqrtAlphasCumprod, t), -gather<acc_t>(table, T, kSqrtOneMinusAlphasCumprod, t)};
    case PairOp::kPredictEpsFromZAndV:
    default:
      return {gather<acc_t>(table, T, kSqrtOneMinusAlphasCumprod, t), gather<acc_t>(table, T, kSqrtAlphasCumprod, t)};
  }
}

// One reverse step, per sample:
//   x0   = x0_xt * x_t + x0_mo * model_output      (eps / v; x0 parameterization uses model_output as is)
//   x0   = clamp(x0, -1, 1) when clip_denoised
//   mean = coef1 * x0 + coef2 * x_t
//   out  = mean + sigma * z,  sigma = [t > 0] exp(0.5 log_var)   (p_sample only)
template <typename acc_t>
struct Step {
  acc_t x0_xt, x0_mo, coef1, coef2, var, log_var, sigma;
};

template <typename acc_t, typename table_t>
DDPM_HD Step<acc_t> step_coefficients(Param param, const table_t* table, int64_t T, int64_t t) {
  Step<acc_t> s;
  if (param == Param::kEps) {
    s.x0_xt = gather<acc_t>(table, T, kSqrtRecipAlphasCumprod, t);
    s.x0_mo = -gather<acc_t>(table, T, kSqrtRecipm1AlphasCumprod, t);
  } else if (param == Param::kV) {
    s.x0_xt = gather<acc_t>(table, T, kSqrtAlphasCumprod, t);
    s.x0_mo = -gather<acc_t>(table, T, kSqrtOneMinusAlphasCumprod, t);
  } else {
    s.x0_xt = acc_t(0);
    s.x0_mo = acc_t(1);
  }
  s.coef1 = gather<acc_t>(table, T, kPosteriorMeanCoef1, t);
  s.coef2 = gather<acc_t>(table, T, kPosteriorMeanCoef2, t);
  s.var = gather<acc_t>(table, T, kPosteriorVariance, t);
  s.log_var = gather<acc_t>(table, T, kPosteriorLogVarianceClipped, t);
  // The seed's nonzero_mask: no noise at t == 0. Out-of-range t keeps the NaN.
  s.sigma = (t == 0) ? acc_t(0) : static_cast<acc_t>(exp(acc_t(0.5) * s.log_var));
  return s;
}

// diffusion_loss: target = tgt_x * x_start + tgt_n * noise (eps: noise, x0: x_start, v: get_v).
template <typename acc_t>
struct LossCoef {
  acc_t tgt_x, tgt_n, weight;  // weight: lvlb_weights[t] of the parameterization
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

}  // namespace ddpm
