// The pair-op family: out = a(t) x + b(t) y with per-sample coefficients gathered from the table
// (q_sample, predict_start_from_noise, predict_noise_from_start, get_v, predict_start_from_z_and_v,
// predict_eps_from_z_and_v), and q_sample's backward, its transpose: (grad_x, grad_noise) = (a g, b g) in
// one read of g.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

#include "coefficients.h"

namespace ddpm {

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

// One call of the family, as csrc/host_ops.h hands it to a backend: out = a x + b y, or with y == nullptr
// q_sample's backward, (out, out2) = (a x, b x) for the incoming gradient x.
struct PairCall {
  PairOp op;
  const at::Tensor& x;
  const at::Tensor* y;
  const at::Tensor &t, &table, &out;
  const at::Tensor* out2;
};

// scalar_t: the outputs' (the promoted dtype of a mixed call); Ptrs: how x and y are read (csrc/family.h).
template <typename scalar_t, typename Ptrs = SamePtrs<scalar_t>>
struct PairKernel : NoPerSampleOutputs {
  using acc_t = at::opmath_type<scalar_t>;
  using Coef = Pair<acc_t>;
  typename Ptrs::in x;
  typename Ptrs::in y;  // null: the transpose
  scalar_t* out;
  scalar_t* out2;
  Timesteps<acc_t> ts;
  PairOp op;

  static PairKernel make(const PairCall& call) {
    return {{},
            Ptrs::input(call.x),
            call.y != nullptr ? Ptrs::input(*call.y) : typename Ptrs::in{},
            call.out.mutable_data_ptr<scalar_t>(),
            call.out2 != nullptr ? call.out2->mutable_data_ptr<scalar_t>() : nullptr,
            Timesteps<acc_t>::of(call.t, call.table),
            call.op};
  }

  DDPM_HD Coef coef(int64_t b) const { return pair_coefficients<acc_t>(op, ts.table, ts.T, ts.t[b]); }

  template <typename IO, typename Z>
  DDPM_LANE void apply(int64_t, int64_t i, int64_t n, const Coef& c, Z&) const {
    using V = typename IO::V;
    V xv[IO::kLanes], r[IO::kLanes];
    IO::load(x + i, xv, n);
    if (y == nullptr) {
      DDPM_UNROLL
      for (int k = 0; k < IO::kLanes; ++k) r[k] = splat<V>(c.b) * xv[k];
      IO::store(out2 + i, r, n);
      DDPM_UNROLL
      for (int k = 0; k < IO::kLanes; ++k) r[k] = splat<V>(c.a) * xv[k];
    } else {
      IO::load(y + i, r, n);
      DDPM_UNROLL
      for (int k = 0; k < IO::kLanes; ++k) r[k] = madd(splat<V>(c.a), xv[k], splat<V>(c.b) * r[k]);
    }
    IO::store(out + i, r, n);
  }
};

}  // namespace ddpm
