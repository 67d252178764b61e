// The multistep-solver family (docs/design.md, "Multistep solvers"): solver_step, one step of DPM-Solver(++),
// UniPC, LCM, ... given as a row of a per-schedule coefficient table, written once for the CPU and CUDA
// backends (csrc/family.h). Per sample b with r = coefficients[step_index[b]] (NaN for an index outside the
// table; the columns are ddpm_kernels._spec.SolverColumns'), x the sample, y the (guided) model output, l the
// last-sample buffer, h_j = ring slot (step_index - j) mod H and z the noise:
//
//   x0  = r.x0_sample x + r.x0_output y             then clamped to +-clip_range (when given)
//   m   = r.m_sample x + r.m_x0 x0 + r.m_output y
//   x_c = r.c_sample x + r.c_last l + r.c_m m + sum_j r.c_hist[j] h_j
//   x'  = r.p_xc x_c + r.p_m m + sum_j r.p_hist[j] h_j + r.p_noise z
//
// in the reference's order of operations (ddpm_kernels.reference.solver_step_ref), then x' into out, m into ring
// slot step_index mod H and x_c into the last-sample buffer: each element is read before the same slice writes
// it, so the slot written may be the one read as h_H and out may be the sample. A coefficient that is exactly 0
// contributes exactly 0 and its tensor is not read (a uniform branch per sample), so an unwritten slot may hold
// anything. The table is read in its own dtype (float32 or float64) and each coefficient rounded to the compute
// dtype, as the reference casts its rows. The per-sample Coef holds the row's coefficients (the first kCoefSlots
// slots' history columns; a longer ring reads the rest per slice) and the ring slots' offsets, so a slice does
// no division and no table read.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include <cmath>
#include <cstdint>
#include <optional>

#include "family.h"
#include "guidance.h"

namespace ddpm {

// The fixed columns of SolverColumns; c_hist starts at kCHist, then p_xc, p_m, p_hist, p_noise after the H
// corrector columns.
enum SolverColumn : int {
  kX0Sample = 0,
  kX0Output = 1,
  kMSample = 2,
  kMX0 = 3,
  kMOutput = 4,
  kCSample = 5,
  kCLast = 6,
  kCM = 7,
  kCHist = 8,
};

// One call of solver_step, as csrc/host_ops.h hands it to a backend: every tensor in the kernel's layout (the
// sample's dense format; the ring's slots dense blocks of it, slot_stride elements apart). uncond and guidance
// are non-null when guided; noise is non-null when given (in-kernel noise from `generator` when stochastic and
// none); history / last_sample null when absent.
struct SolverStepCall {
  const at::Tensor &sample, &model_output;
  const at::Tensor* uncond;
  const at::Tensor* guidance;
  const at::Tensor& coefficients;  // (steps, 11 + 2 H), float32 or float64, contiguous
  const at::Tensor& step_index;    // int64 (B,)
  const at::Tensor* history;       // (H, *sample.shape)
  const at::Tensor* last_sample;
  bool stochastic;
  std::optional<double> clip_range;
  double guidance_rescale;
  const at::Tensor* noise;
  std::optional<at::Generator> generator;
  const at::Tensor& out;
  int64_t sample_offset = 0;

  bool guided() const { return uncond != nullptr; }
};

// Python's (floored) i mod n, n > 0: the ring slot of step i, also for a negative (bad) index, as the
// reference's torch.remainder.
DDPM_HD int64_t floor_mod(int64_t i, int64_t n) {
  const int64_t r = i % n;
  return r < 0 ? r + n : r;
}

// Ring slots whose two coefficients the per-sample Coef holds (every solver of ddpm_kernels.solvers: UniPC of
// order 3 reads 3); a longer ring reads its further columns from the row per slice. Small, for CUDA's
// shared-memory cache of a tile's Coefs (csrc/cuda/solver.cu checks the size).
constexpr int kCoefSlots = 3;

// The live terms of a sample's step, one bit per coefficient that is not 0: bits 0..7 the columns kX0Sample ..
// kCM (c_last only with a last-sample buffer), then the ones below. A slice tests one integer per term instead
// of comparing floats; a term whose bit is clear is exactly 0 and its tensor is not read.
enum SolverLive : uint32_t {
  kLivePXc = 1u << 8,
  kLivePM = 1u << 9,
  kLivePNoise = 1u << 10,
  kLiveX = 1u << 11,                     // the sample is read
  kLiveY = 1u << 12,                     // the model output is read
  kLiveCHist = 1u << 16,                 // << (j - 1): c_hist of slot j <= kCoefSlots
  kLivePHist = 1u << (16 + kCoefSlots),  // << (j - 1): p_hist of slot j <= kCoefSlots
};

// GuidedT / ClipT: bool, or std::integral_constant<bool, ...>; SlotsT: the ring's H, int64_t or
// std::integral_constant<int64_t, H> (csrc/family.h). Ptrs: how the sample and the model outputs are read
// (csrc/mixed.h's MixedPtrs: each in its own dtype; scalar_t, the dtype of out and the state, is then float).
template <typename scalar_t, typename GuidedT, typename ClipT, typename SlotsT, typename Ptrs = SamePtrs<scalar_t>>
struct SolverStepKernel : NoPerSampleOutputs {
  using acc_t = at::opmath_type<scalar_t>;
  // Everything a slice needs from the row and the step index, derived once per sample: no division and no
  // table read per slice.
  struct Coef {
    acc_t x0_sample, x0_output, m_sample, m_x0, m_output, c_sample, c_last, c_m, p_xc, p_m, p_noise;
    acc_t c_hist[kCoefSlots], p_hist[kCoefSlots];  // slots j = 1 .. min(H, kCoefSlots)
    int64_t row;     // the sample's row of the table; -1 when its index is outside (a NaN row)
    int64_t newest;  // element offset of h_1's slot, (step_index - 1) mod H, in the ring
    int64_t write;   // element offset of slot step_index mod H
    GuidanceCoef<acc_t> guide;
    uint32_t live;  // SolverLive bits
  };
  typename Ptrs::in x;
  scalar_t* out;
  Guidance<scalar_t, Ptrs> guide;  // the model output (csrc/guidance.h); its rescale sums set by the backend's pass
  const float* table32;            // one of the two is set
  const double* table64;
  int64_t rows, width;
  const int64_t* step_index;
  scalar_t* ring;  // nullptr: no ring
  SlotsT slots;
  int64_t slot_stride;
  scalar_t* last;  // nullptr: no last-sample buffer
  acc_t clip;
  GuidedT guided;
  ClipT clipped;

  static SolverStepKernel make(const SolverStepCall& call, GuidedT guided, ClipT clipped, SlotsT slots) {
    const int64_t N = call.sample.numel() / call.sample.size(0);
    const bool wide = call.coefficients.scalar_type() == at::kDouble;
    return {{},
            Ptrs::input(call.sample),
            call.out.mutable_data_ptr<scalar_t>(),
            Guidance<scalar_t, Ptrs>::make(call.model_output, call.uncond, call.guidance, N, 0,
                                           call.guidance_rescale),
            wide ? nullptr : call.coefficients.const_data_ptr<float>(),
            wide ? call.coefficients.const_data_ptr<double>() : nullptr,
            call.coefficients.size(0),
            call.coefficients.size(1),
            call.step_index.const_data_ptr<int64_t>(),
            call.history != nullptr ? call.history->mutable_data_ptr<scalar_t>() : nullptr,
            slots,
            call.sample.numel(),
            call.last_sample != nullptr ? call.last_sample->mutable_data_ptr<scalar_t>() : nullptr,
            static_cast<acc_t>(call.clip_range.value_or(0.0)),
            guided,
            clipped};
  }

  // Column k of `row` in the compute dtype; NaN for row -1.
  DDPM_HD acc_t column(int64_t row, int k) const {
    if (row < 0) return acc_t(NAN);
    const int64_t at = row * width + k;
    return table64 != nullptr ? static_cast<acc_t>(table64[at]) : static_cast<acc_t>(table32[at]);
  }

  DDPM_HD Coef coef(int64_t b) const {
    Coef c;
    const int64_t step = step_index[b];
    c.row = step >= 0 && step < rows ? step : -1;
    c.x0_sample = column(c.row, kX0Sample);
    c.x0_output = column(c.row, kX0Output);
    c.m_sample = column(c.row, kMSample);
    c.m_x0 = column(c.row, kMX0);
    c.m_output = column(c.row, kMOutput);
    c.c_sample = column(c.row, kCSample);
    c.c_last = column(c.row, kCLast);
    c.c_m = column(c.row, kCM);
    c.p_xc = column(c.row, int(kCHist + slots));
    c.p_m = column(c.row, int(kCHist + slots + 1));
    c.p_noise = column(c.row, int(kCHist + 2 * slots + 2));
    for (int j = 0; j < kCoefSlots; ++j) {
      c.c_hist[j] = j < slots ? column(c.row, kCHist + j) : acc_t(0);
      c.p_hist[j] = j < slots ? column(c.row, int(kCHist + slots + 2 + j)) : acc_t(0);
    }
    c.newest = slots > 0 ? floor_mod(step - 1, slots) * slot_stride : 0;
    c.write = slots > 0 ? floor_mod(step, slots) * slot_stride : 0;
    c.guide = guided ? guide.coef(b) : GuidanceCoef<acc_t>{acc_t(0), acc_t(1)};
    const acc_t fixed[] = {c.x0_sample, c.x0_output, c.m_sample, c.m_x0, c.m_output, c.c_sample,
                           last != nullptr ? c.c_last : acc_t(0), c.c_m, c.p_xc, c.p_m, c.p_noise};
    c.live = 0;
    for (int k = 0; k < 11; ++k) c.live |= fixed[k] != acc_t(0) ? 1u << k : 0u;
    for (int j = 0; j < kCoefSlots; ++j) {
      c.live |= c.c_hist[j] != acc_t(0) ? uint32_t(kLiveCHist) << j : 0u;
      c.live |= c.p_hist[j] != acc_t(0) ? uint32_t(kLivePHist) << j : 0u;
    }
    if (c.live & ((1u << kX0Sample) | (1u << kMSample) | (1u << kCSample))) c.live |= kLiveX;
    if (c.live & ((1u << kX0Output) | (1u << kMOutput))) c.live |= kLiveY;
    return c;
  }

  // The corrector's (predictor's) coefficient of h_j, j >= 1.
  DDPM_HD acc_t c_hist(const Coef& c, int64_t j) const {
    return j <= kCoefSlots ? c.c_hist[j - 1] : column(c.row, int(kCHist + j - 1));
  }
  DDPM_HD acc_t p_hist(const Coef& c, int64_t j) const {
    return j <= kCoefSlots ? c.p_hist[j - 1] : column(c.row, int(kCHist + slots + 1 + j));
  }

  static DDPM_HD bool is_live(const Coef& c, uint32_t bit) { return (c.live & bit) != 0; }

  // acc += w v over one slice when `live` (w is not 0), exactly nothing otherwise (whatever v holds).
  template <typename IO>
  static DDPM_LANE void add_term(typename IO::V* acc, bool live, acc_t w, const typename IO::V* v) {
    using V = typename IO::V;
    if (!live) return;
    DDPM_UNROLL
    for (int k = 0; k < IO::kLanes; ++k) acc[k] = madd(splat<V>(w), v[k], acc[k]);
  }

  // acc += w p[i ..] over one slice, the tensor read only when `live` (p may then be null).
  template <typename IO>
  static DDPM_LANE void add_loaded(typename IO::V* acc, bool live, acc_t w, const scalar_t* p, int64_t i, int64_t n) {
    if (!live) return;
    typename IO::V v[IO::kLanes];
    IO::load(p + i, v, n);
    add_term<IO>(acc, true, w, v);
  }

  // acc += sum_j w_j h_j over one slice, j = 1 .. H, w the corrector's or the predictor's history columns: the
  // ring walked back from h_1's slot.
  template <typename IO, bool kPredictor>
  DDPM_LANE void add_history(typename IO::V* acc, const Coef& c, int64_t i, int64_t n) const {
    int64_t at = c.newest;
    constexpr uint32_t kFirst = kPredictor ? kLivePHist : kLiveCHist;
    for (int64_t j = 1; j <= slots; ++j) {
      const acc_t w = kPredictor ? p_hist(c, j) : c_hist(c, j);
      const bool live = j <= kCoefSlots ? is_live(c, kFirst << (j - 1)) : w != acc_t(0);
      add_loaded<IO>(acc, live, w, ring + at, i, n);
      at = (at == 0 ? slots * slot_stride : at) - slot_stride;
    }
  }

  template <typename IO, typename Z>
  DDPM_LANE void apply(int64_t b, int64_t i, int64_t n, const Coef& c, Z& z) const {
    using V = typename IO::V;
    V xv[IO::kLanes], yv[IO::kLanes], x0[IO::kLanes], m[IO::kLanes], xc[IO::kLanes], r[IO::kLanes];
    DDPM_UNROLL
    for (int k = 0; k < IO::kLanes; ++k) {
      x0[k] = splat<V>(acc_t(0));
      m[k] = x0[k];
      xc[k] = x0[k];
      r[k] = x0[k];
      xv[k] = x0[k];  // read only when loaded (the live bits); set for the compilers' flow analysis
      yv[k] = x0[k];
    }
    // the sample and the model output are read where a coefficient uses them (the zero rule)
    if (is_live(c, kLiveX)) IO::load(x + i, xv, n);
    if (is_live(c, kLiveY)) {
      IO::load(guide.cond + i, yv, n);
      if (guided) guide.template mix<IO>(b, i, n, c.guide, yv);
    }
    add_term<IO>(x0, is_live(c, 1u << kX0Sample), c.x0_sample, xv);
    add_term<IO>(x0, is_live(c, 1u << kX0Output), c.x0_output, yv);
    if (clipped) {
      DDPM_UNROLL
      for (int k = 0; k < IO::kLanes; ++k) x0[k] = clamp_keep_nan(x0[k], splat<V>(-clip), splat<V>(clip));
    }
    add_term<IO>(m, is_live(c, 1u << kMSample), c.m_sample, xv);
    add_term<IO>(m, is_live(c, 1u << kMX0), c.m_x0, x0);
    add_term<IO>(m, is_live(c, 1u << kMOutput), c.m_output, yv);
    // the corrector (the last-sample bit is clear without a buffer)
    add_term<IO>(xc, is_live(c, 1u << kCSample), c.c_sample, xv);
    add_loaded<IO>(xc, is_live(c, 1u << kCLast), c.c_last, last, i, n);
    add_term<IO>(xc, is_live(c, 1u << kCM), c.c_m, m);
    add_history<IO, false>(xc, c, i, n);
    // the predictor
    add_term<IO>(r, is_live(c, kLivePXc), c.p_xc, xc);
    add_term<IO>(r, is_live(c, kLivePM), c.p_m, m);
    add_history<IO, true>(r, c, i, n);
    if constexpr (Z::present()) {
      if (is_live(c, kLivePNoise)) {
        V zv[IO::kLanes];
        z.template get<IO>(i, n, zv);
        add_term<IO>(r, true, c.p_noise, zv);
      }
    }
    // every read done: the step, then the state
    IO::store(out + i, r, n);
    if (slots > 0) IO::store(ring + c.write + i, m, n);
    if (last != nullptr) IO::store(last + i, xc, n);
  }
};

}  // namespace ddpm
