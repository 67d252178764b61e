// Per-sample coefficients of the sampler steps (ddim_step, ddpm_step), shared by the CPU and CUDA kernels.
//
// A step goes t -> t_prev between arbitrary timesteps, so its coefficients are not rows of the schedule table:
// they are derived per sample from alphas_cumprod[t] and alphas_cumprod[t_prev]. The derivation runs in
// float64 from the float64 table (DiffusionSchedule.table(torch.float64)) with the formulas of
// ddpm_kernels/reference.py (ddim_step_ref / ddpm_step_ref), and each coefficient is rounded once to the
// compute dtype, as the reference does: the cancelling differences (1 - ab_t, 1 - ab_t / ab_prev near
// t = 0) never happen in float32. Only the elementwise math runs in float32 (float64 for float64 data).
//
// t outside [0, T), or t_prev outside [-1, T), gives NaN coefficients; nothing outside the table is read.
#pragma once

#include <cmath>
#include <cstdint>

#include "coefficients.h"

namespace ddpm {

// variance_type of ddpm_step; the *_log variants give the same standard deviation (see the reference).
enum class Variance : int { kFixedSmall = 0, kFixedLarge = 1, kLearned = 2, kLearnedRange = 3 };

// Slots of the per-sample coefficient array: x0 from the model output (eps / x0 / v) uses kAT, kST, kRA, kRS
// in both ops; the remaining slots are op-specific.
enum SamplerSlot : int {
  kAT = 0,  // sqrt(ab_t)
  kST = 1,  // sqrt(1 - ab_t)
  kRA = 2,  // 1 / sqrt(ab_t)
  kRS = 3,  // ddim: sqrt(1 - ab_t) / sqrt(ab_t); ddpm: sqrt((1 - ab_t) / ab_t)
  // ddim_step
  kDdimAPrev = 4,  // sqrt(ab_prev)
  kDdimDir = 5,    // sqrt(max(1 - ab_prev - sigma^2, 0))
  kDdimSigma = 6,  // eta sqrt((1 - ab_prev) / (1 - ab_t) (1 - ab_t / ab_prev))
  // ddpm_step
  kDdpmCoefX0 = 4,  // sqrt(ab_prev) beta / (1 - ab_t)
  kDdpmCoefXt = 5,  // sqrt(1 - beta) (1 - ab_prev) / (1 - ab_t)
  kDdpmStd = 6,     // [t > 0] * std for fixed variances (rounded factors multiplied in acc_t, as the reference)
  kDdpmMask = 7,    // [t > 0]
  kDdpmMinLog = 8,  // log(var), learned_range
  kDdpmMaxLog = 9,  // log(beta), learned_range
  kSamplerSlots = 10,
};

// (ab_t, ab_prev) in float64. t_prev == -1: ab_prev = 1 when set_alpha_to_one, else alphas_cumprod[0].
DDPM_HD void step_alphas(const double* table64, int64_t T, int64_t t, int64_t t_prev, bool set_alpha_to_one,
                         double& ab_t, double& ab_prev) {
  const double* ac = table64 + int64_t(kAlphasCumprod) * T;
  ab_t = (t >= 0 && t < T) ? ac[t] : static_cast<double>(NAN);
  if (t_prev == -1) {
    ab_prev = set_alpha_to_one ? 1.0 : ac[0];
  } else {
    ab_prev = (t_prev >= 0 && t_prev < T) ? ac[t_prev] : static_cast<double>(NAN);
  }
}

// max(v, lo) that keeps NaN, as torch.clamp.
DDPM_HD double clamp_min_nan(double v, double lo) { return v < lo ? lo : v; }

template <typename acc_t>
DDPM_HD void ddim_coefficients(const double* table64, int64_t T, int64_t t, int64_t t_prev, double eta,
                               bool set_alpha_to_one, acc_t* c) {
  double ab_t, ab_p;
  step_alphas(table64, T, t, t_prev, set_alpha_to_one, ab_t, ab_p);
  const double sqrt_ab_t = sqrt(ab_t), sqrt_1m_t = sqrt(1.0 - ab_t);
  const double var = (1.0 - ab_p) / (1.0 - ab_t) * (1.0 - ab_t / ab_p);
  const double sigma = eta * sqrt(var);
  // 1 - ab_prev - sigma^2 >= 0 for eta <= 1; clamped so eta > 1 degrades to no direction term, not NaN
  const double dir = sqrt(clamp_min_nan(1.0 - ab_p - sigma * sigma, 0.0));
  c[kAT] = static_cast<acc_t>(sqrt_ab_t);
  c[kST] = static_cast<acc_t>(sqrt_1m_t);
  c[kRA] = static_cast<acc_t>(1.0 / sqrt_ab_t);
  c[kRS] = static_cast<acc_t>(sqrt_1m_t / sqrt_ab_t);
  c[kDdimAPrev] = static_cast<acc_t>(sqrt(ab_p));
  c[kDdimDir] = static_cast<acc_t>(dir);
  c[kDdimSigma] = static_cast<acc_t>(sigma);
  c[7] = c[8] = c[9] = acc_t(0);
}

template <typename acc_t>
DDPM_HD void ddpm_coefficients(const double* table64, int64_t T, int64_t t, int64_t t_prev, Variance variance,
                               acc_t* c) {
  double ab_t, ab_p;
  step_alphas(table64, T, t, t_prev, true, ab_t, ab_p);
  const double alpha = ab_t / ab_p;
  const double beta = 1.0 - alpha;
  // diffusers clamps before taking any log; CompVis' posterior_log_variance_clipped is the same clamp
  const double var = clamp_min_nan((1.0 - ab_p) / (1.0 - ab_t) * beta, 1e-20);
  c[kAT] = static_cast<acc_t>(sqrt(ab_t));
  c[kST] = static_cast<acc_t>(sqrt(1.0 - ab_t));
  c[kRA] = static_cast<acc_t>(1.0 / sqrt(ab_t));
  c[kRS] = static_cast<acc_t>(sqrt((1.0 - ab_t) / ab_t));
  c[kDdpmCoefX0] = static_cast<acc_t>(sqrt(ab_p) * beta / (1.0 - ab_t));
  c[kDdpmCoefXt] = static_cast<acc_t>(sqrt(alpha) * (1.0 - ab_p) / (1.0 - ab_t));
  const acc_t mask = t > 0 ? acc_t(1) : acc_t(0);
  const double std_fixed = variance == Variance::kFixedLarge ? sqrt(beta) : sqrt(var);
  c[kDdpmStd] = mask * static_cast<acc_t>(std_fixed);
  c[kDdpmMask] = mask;
  c[kDdpmMinLog] = static_cast<acc_t>(log(var));
  c[kDdpmMaxLog] = static_cast<acc_t>(log(beta));
}

}  // namespace ddpm
