// CPU kernels of every ddpm_kernels operator: one pass over the data, per-sample coefficients gathered from
// the schedule table by t, math in float32 (float64 for float64 data) on at::vec::Vectorized lanes, work
// split with at::parallel_for.
//
// setup.py compiles this file once per x86 instruction set (baseline, AVX2, AVX-512) into separate
// libraries; ddpm_kernels/extension.py loads the widest one torch.backends.cpu.get_cpu_capability() allows,
// as PyTorch does with its own per-ISA kernels. Vectorized<T> picks its implementation from the
// CPU_CAPABILITY_* macro setup.py defines for each build.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <cstring>
#include <mutex>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "../coefficients.h"
#include "../host_ops.h"
#include "../module.h"
#include "../sampler_coefficients.h"

namespace ddpm {
namespace cpu {
namespace {

using at::vec::Vectorized;

// Unit of parallel work and of the in-kernel noise stream: noise for element i depends only on i and the
// generator's seed, so results do not depend on the thread count.
constexpr int64_t kBlock = 256;
// Blocks per parallel task (~32K elements): below that, threading costs more than it saves.
constexpr int64_t kGrainBlocks = 128;

#if defined(CPU_CAPABILITY_DEFAULT) && (defined(__x86_64__) || defined(_M_X64))
// The x86-64 baseline build runs plain element loops, which GCC vectorizes for SSE2 (with
// -fno-trapping-math for the clamp). The generic Vectorized<T> of a baseline build keeps its lanes in
// memory and measured several times slower. Other architectures' baseline Vectorized is native (NEON).
#define DDPM_SCALAR_LANES 1
#endif

// The lane helpers below take a Vectorized<T> or, in the scalar-lanes build, a plain float / double.
template <typename V>
constexpr bool kScalarLane = std::is_floating_point_v<V>;

// a * b + c: one fused instruction where the ISA has FMA.
template <typename V>
C10_ALWAYS_INLINE V madd(const V& a, const V& b, const V& c) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  if constexpr (!kScalarLane<V>) return at::vec::fmadd(a, b, c);
#endif
  return a * b + c;
}

// clamp that keeps NaN (as torch.clamp).
template <typename V>
C10_ALWAYS_INLINE V clampv(const V& x, const V& lo, const V& hi) {
  if constexpr (kScalarLane<V>) {
    return std::min(std::max(x, lo), hi);
  } else {
    return at::vec::clamp(x, lo, hi);
  }
}

template <typename V>
C10_ALWAYS_INLINE V absv(const V& x) {
  if constexpr (kScalarLane<V>) {
    return std::abs(x);
  } else {
    return x.abs();
  }
}

template <typename V>
C10_ALWAYS_INLINE V expv(const V& x) {
  if constexpr (kScalarLane<V>) {
    return std::exp(x);
  } else {
    return x.exp();
  }
}

// sign(d), 0 at d == 0 as torch's abs backward.
template <typename V>
C10_ALWAYS_INLINE V signv(const V& d) {
  if constexpr (kScalarLane<V>) {
    return static_cast<V>((d > V(0)) - (d < V(0)));
  } else {
    using T = typename V::value_type;
    const V zero(T(0)), one(T(1));
    return ((d > zero) & one) - ((d < zero) & one);
  }
}

template <typename V>
inline double hsum(const V& v) {
  if constexpr (kScalarLane<V>) {
    return static_cast<double>(v);
  } else {
    alignas(64) typename V::value_type lanes[V::size()];
    v.store(lanes);
    double s = 0;
    for (int64_t j = 0; j < V::size(); ++j) s += static_cast<double>(lanes[j]);
    return s;
  }
}

#if defined(DDPM_SCALAR_LANES)
// One element at a time, in acc_t.
template <typename scalar_t>
struct Lanes {
  using acc_t = at::opmath_type<scalar_t>;
  using AVec = acc_t;
  static constexpr int kVecs = 1;
  static constexpr int64_t size() { return 1; }
  static C10_ALWAYS_INLINE void load(const scalar_t* p, AVec* v, int64_t) { v[0] = static_cast<acc_t>(*p); }
  static C10_ALWAYS_INLINE void store(scalar_t* p, const AVec* v, int64_t) { *p = static_cast<scalar_t>(v[0]); }
  static C10_ALWAYS_INLINE void load_acc(const acc_t* p, AVec* v) { v[0] = *p; }
};
#else
// Partial vectors (tails) stay out of line so the full-vector path inlines into the loops.
template <typename V, typename T>
C10_NOINLINE V load_partial(const T* p, int64_t n) {
  return V::loadu(p, n);
}
template <typename V, typename T>
C10_NOINLINE void store_partial(const V& v, T* p, int64_t n) {
  v.store(p, static_cast<int>(n));
}

// A vector-width slice of a tensor loaded as float32 (float64) lanes: one Vectorized<acc_t> for
// float/double data, two for float16/bfloat16 (converted to float32 on load, rounded once on store).
template <typename scalar_t, typename Enable = void>
struct Lanes {
  using acc_t = scalar_t;
  using AVec = Vectorized<acc_t>;
  static constexpr int kVecs = 1;
  static constexpr int64_t size() { return AVec::size(); }
  static C10_ALWAYS_INLINE void load(const scalar_t* p, AVec* v, int64_t n) {
    v[0] = C10_LIKELY(n == size()) ? AVec::loadu(p) : load_partial<AVec>(p, n);
  }
  static C10_ALWAYS_INLINE void store(scalar_t* p, const AVec* v, int64_t n) {
    if (C10_LIKELY(n == size())) v[0].store(p); else store_partial(v[0], p, n);
  }
  // The same slice read from an acc_t buffer (the in-kernel noise), always full vectors.
  static C10_ALWAYS_INLINE void load_acc(const acc_t* p, AVec* v) { v[0] = AVec::loadu(p); }
};

template <typename scalar_t>
struct Lanes<scalar_t, std::enable_if_t<at::vec::is_reduced_floating_point_v<scalar_t>>> {
  using acc_t = float;
  using AVec = Vectorized<float>;
  using SVec = Vectorized<scalar_t>;
  static constexpr int kVecs = 2;
  static constexpr int64_t size() { return SVec::size(); }
  static C10_ALWAYS_INLINE void load(const scalar_t* p, AVec* v, int64_t n) {
    const SVec s = C10_LIKELY(n == size()) ? SVec::loadu(p) : load_partial<SVec>(p, n);
    std::tie(v[0], v[1]) = at::vec::convert_to_float<scalar_t>(s);
  }
  static C10_ALWAYS_INLINE void store(scalar_t* p, const AVec* v, int64_t n) {
    const SVec s = at::vec::convert_from_float<scalar_t>(v[0], v[1]);
    if (C10_LIKELY(n == size())) s.store(p); else store_partial(s, p, n);
  }
  static C10_ALWAYS_INLINE void load_acc(const acc_t* p, AVec* v) {
    v[0] = AVec::loadu(p);
    v[1] = AVec::loadu(p + AVec::size());
  }
};
#endif

// Calls f(b, begin, end) for every sample-homogeneous piece of the elements of blocks [blk0, blk1).
template <typename F>
inline void for_each_segment(int64_t blk0, int64_t blk1, int64_t numel, int64_t N, const F& f) {
  int64_t begin = blk0 * kBlock;
  const int64_t end = std::min(blk1 * kBlock, numel);
  while (begin < end) {
    const int64_t b = begin / N;
    const int64_t stop = std::min(end, (b + 1) * N);
    f(b, begin, stop);
    begin = stop;
  }
}

template <typename F>
inline void parallel_blocks(int64_t numel, const F& f) {
  const int64_t nblocks = (numel + kBlock - 1) / kBlock;
  at::parallel_for(0, nblocks, kGrainBlocks, f);
}

// ------------------------------------------------------------------------------------------- two-operand ops
// The kernels below take data of at least one element: the empty cases are handled in csrc/host_ops.h.
template <typename scalar_t>
void pair_impl(PairOp op, const at::Tensor& x, const at::Tensor& y, const at::Tensor& t, const at::Tensor& table,
               const at::Tensor& out) {
  using L = Lanes<scalar_t>;
  using acc_t = typename L::acc_t;
  using AVec = typename L::AVec;
  const int64_t numel = x.numel();
  const int64_t N = numel / x.size(0), T = table.size(1);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* yp = y.const_data_ptr<scalar_t>();
  scalar_t* op_ = out.mutable_data_ptr<scalar_t>();
  const int64_t* tp = t.const_data_ptr<int64_t>();
  const acc_t* tab = table.const_data_ptr<acc_t>();
  parallel_blocks(numel, [&](int64_t blk0, int64_t blk1) {
    for_each_segment(blk0, blk1, numel, N, [&](int64_t b, int64_t i, int64_t stop) {
      const Pair<acc_t> c = pair_coefficients<acc_t>(op, tab, T, tp[b]);
      const AVec ca(c.a), cb(c.b);
      AVec xv[L::kVecs], yv[L::kVecs];
      for (; i < stop; i += L::size()) {
        const int64_t n = std::min<int64_t>(L::size(), stop - i);
        L::load(xp + i, xv, n);
        L::load(yp + i, yv, n);
        for (int k = 0; k < L::kVecs; ++k) xv[k] = madd(ca, xv[k], cb * yv[k]);
        L::store(op_ + i, xv, n);
      }
    });
  });
}

// grad_x_start = sqrt(ab) grad, grad_noise = sqrt(1 - ab) grad: one read, two writes.
template <typename scalar_t>
void q_sample_backward_impl(const at::Tensor& g, const at::Tensor& t, const at::Tensor& table, const at::Tensor& gx,
                            const at::Tensor& gn) {
  using L = Lanes<scalar_t>;
  using acc_t = typename L::acc_t;
  using AVec = typename L::AVec;
  const int64_t numel = g.numel();
  const int64_t N = numel / g.size(0), T = table.size(1);
  const scalar_t* gp = g.const_data_ptr<scalar_t>();
  scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
  scalar_t* gnp = gn.mutable_data_ptr<scalar_t>();
  const int64_t* tp = t.const_data_ptr<int64_t>();
  const acc_t* tab = table.const_data_ptr<acc_t>();
  parallel_blocks(numel, [&](int64_t blk0, int64_t blk1) {
    for_each_segment(blk0, blk1, numel, N, [&](int64_t b, int64_t i, int64_t stop) {
      const Pair<acc_t> c = pair_coefficients<acc_t>(PairOp::kQSample, tab, T, tp[b]);
      const AVec ca(c.a), cb(c.b);
      AVec gv[L::kVecs], o[L::kVecs];
      for (; i < stop; i += L::size()) {
        const int64_t n = std::min<int64_t>(L::size(), stop - i);
        L::load(gp + i, gv, n);
        for (int k = 0; k < L::kVecs; ++k) o[k] = ca * gv[k];
        L::store(gxp + i, o, n);
        for (int k = 0; k < L::kVecs; ++k) o[k] = cb * gv[k];
        L::store(gnp + i, o, n);
      }
    });
  });
}

// ----------------------------------------------------------------------------------- posterior / sampling
// Philox4x32-10 (Salmon et al., SC'11), the counter-based generator of curand and torch's CUDA RNG.
inline void philox4x32_10(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0, uint32_t k1) {
  for (int r = 0; r < 10; ++r) {
    const uint64_t p0 = uint64_t(0xD2511F53u) * c0;
    const uint64_t p1 = uint64_t(0xCD9E8D57u) * c2;
    const uint32_t n0 = uint32_t(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = uint32_t(p0 >> 32) ^ c3 ^ k1;
    c1 = uint32_t(p1);
    c3 = uint32_t(p0);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}

constexpr int64_t kCounters = kBlock / 4;  // one Philox call gives four normals

// Standard normals of block `blk` into buf[0, kBlock): Philox4x32-10 keyed by the per-call seed, counter =
// global 4-element group, Box-Muller on each pair of 24-bit uniforms. Element blk*kBlock + k*kCounters + j
// takes output k of counter blk*kCounters + j, so every lane store is contiguous.
inline void normal_block(int64_t blk, uint64_t seed, float* buf) {
  alignas(64) uint32_t r[4][kCounters];
  const uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
  const uint64_t base = uint64_t(blk) * kCounters;
  // Independent lanes: the compiler vectorizes this loop at the build's vector width.
  for (int64_t j = 0; j < kCounters; ++j) {
    const uint64_t ctr = base + uint64_t(j);
    uint32_t c0 = uint32_t(ctr), c1 = uint32_t(ctr >> 32), c2 = 0, c3 = 0;
    philox4x32_10(c0, c1, c2, c3, k0, k1);
    r[0][j] = c0;
    r[1][j] = c1;
    r[2][j] = c2;
    r[3][j] = c3;
  }
  alignas(64) float u[4][kCounters];
  for (int k = 0; k < 4; ++k)
    for (int64_t j = 0; j < kCounters; ++j)
      // (0, 1) exactly: 24 random bits, centred in their interval, so log(u) is finite.
      u[k][j] = (static_cast<float>(r[k][j] >> 8) + 0.5f) * 5.9604644775390625e-08f;
  using FVec = Vectorized<float>;
  const FVec minus_two(-2.0f), two_pi(6.283185307179586f);
  for (int pair = 0; pair < 2; ++pair) {
    for (int64_t j = 0; j < kCounters; j += FVec::size()) {
      const FVec radius = (minus_two * FVec::loadu(&u[2 * pair][j]).log()).sqrt();
      const FVec theta = two_pi * FVec::loadu(&u[2 * pair + 1][j]);
      (radius * theta.cos()).store(buf + (2 * pair) * kCounters + j);
      (radius * theta.sin()).store(buf + (2 * pair + 1) * kCounters + j);
    }
  }
}

// The in-kernel noise of element i, normal_block's element i % kBlock of block i / kBlock: p_sample and the
// sampler steps read it the same way, so calls keyed by the same generator state see the same normals. One per
// parallel task, keeping the last block it generated.
template <typename L>
struct BlockNoise {
  using acc_t = typename L::acc_t;
  alignas(64) float f[kBlock];
  alignas(64) acc_t buf[kBlock + 64];
  int64_t blk = -1;
  uint64_t seed = 0;

  void fill(int64_t b) {
    normal_block(b, seed, f);
    for (int64_t j = 0; j < kBlock; ++j) buf[j] = static_cast<acc_t>(f[j]);
    blk = b;
  }
  C10_ALWAYS_INLINE void get(int64_t i, typename L::AVec* zv) {
    const int64_t b = i / kBlock;
    if (b != blk) fill(b);
    const int64_t off = i - b * kBlock;
    if (off + L::size() <= kBlock) {
      L::load_acc(buf + off, zv);
      return;
    }
    // The vector straddles two noise blocks (a sample boundary not aligned to the vector width).
    alignas(64) acc_t tmp[64 + 64];
    const int64_t first = kBlock - off;
    std::memcpy(tmp, buf + off, sizeof(acc_t) * first);
    fill(b + 1);
    std::memcpy(tmp + first, buf, sizeof(acc_t) * (L::size() - first));
    L::load_acc(tmp, zv);
  }
};

enum class StepMode { kMean, kSampleNoise, kSampleRandom };

// Everything the step kernels share. `mo` is model_output (x_start for q_posterior), `noise` the given
// noise (kSampleNoise), `seed` the per-call key of the in-kernel noise (kSampleRandom).
template <typename scalar_t>
struct StepArgs {
  const scalar_t* x_t;
  const scalar_t* mo;
  const scalar_t* noise;
  scalar_t* out;
  const int64_t* t;
  const typename Lanes<scalar_t>::acc_t* table;
  int64_t T, numel, N;
  uint64_t seed;
};

template <typename scalar_t, StepMode kMode, Param kParam, bool kClip>
void step_kernel(const StepArgs<scalar_t>& a) {
  using L = Lanes<scalar_t>;
  using acc_t = typename L::acc_t;
  using AVec = typename L::AVec;
  parallel_blocks(a.numel, [&](int64_t blk0, int64_t blk1) {
    BlockNoise<L> noise;
    noise.seed = a.seed;
    for_each_segment(blk0, blk1, a.numel, a.N, [&](int64_t b, int64_t i, int64_t stop) {
      const Step<acc_t> c = step_coefficients<acc_t>(kParam, a.table, a.T, a.t[b]);
      const AVec x0_xt(c.x0_xt), x0_mo(c.x0_mo), coef1(c.coef1), coef2(c.coef2), sigma(c.sigma);
      const AVec lo(acc_t(-1)), hi(acc_t(1));
      AVec xv[L::kVecs], mv[L::kVecs], zv[L::kVecs];
      for (; i < stop; i += L::size()) {
        const int64_t n = std::min<int64_t>(L::size(), stop - i);
        L::load(a.x_t + i, xv, n);
        L::load(a.mo + i, mv, n);
        if constexpr (kMode == StepMode::kSampleNoise) {
          L::load(a.noise + i, zv, n);
        } else if constexpr (kMode == StepMode::kSampleRandom) {
          noise.get(i, zv);
        }
        for (int k = 0; k < L::kVecs; ++k) {
          AVec x0;
          if constexpr (kParam == Param::kX0) {
            x0 = mv[k];
          } else {
            x0 = madd(x0_xt, xv[k], x0_mo * mv[k]);
          }
          if constexpr (kClip) x0 = clampv(x0, lo, hi);
          AVec r = madd(coef1, x0, coef2 * xv[k]);
          if constexpr (kMode == StepMode::kSampleNoise || kMode == StepMode::kSampleRandom) {
            r = madd(sigma, zv[k], r);
          }
          xv[k] = r;
        }
        L::store(a.out + i, xv, n);
      }
    });
  });
}

// f(std::integral_constant<Param, P>()) for the runtime parameterization: one instantiation per value.
template <typename F>
void with_param(Param param, const F& f) {
  switch (param) {
    case Param::kEps: return f(std::integral_constant<Param, Param::kEps>());
    case Param::kX0: return f(std::integral_constant<Param, Param::kX0>());
    case Param::kV: return f(std::integral_constant<Param, Param::kV>());
  }
}

// f(std::true_type()) or f(std::false_type()).
template <typename F>
void with_bool(bool value, const F& f) {
  if (value) return f(std::true_type());
  return f(std::false_type());
}

// var and log_var, (B, 1, ..., 1) in the table's dtype.
void variances(const at::Tensor& t, const at::Tensor& table, const at::Tensor& var, const at::Tensor& log_var) {
  AT_DISPATCH_FLOATING_TYPES(table.scalar_type(), "ddpm_kernels_variances", [&] {
    const scalar_t* tab = table.const_data_ptr<scalar_t>();
    const int64_t* tp = t.const_data_ptr<int64_t>();
    const int64_t T = table.size(1);
    scalar_t* v = var.mutable_data_ptr<scalar_t>();
    scalar_t* lv = log_var.mutable_data_ptr<scalar_t>();
    for (int64_t b = 0; b < t.size(0); ++b) {
      v[b] = gather<scalar_t>(tab, T, kPosteriorVariance, tp[b]);
      lv[b] = gather<scalar_t>(tab, T, kPosteriorLogVarianceClipped, tp[b]);
    }
  });
}

template <StepMode kMode>
void run_step(const at::Tensor& x_t, const at::Tensor& t, const at::Tensor& mo, const at::Tensor& table,
              const at::Tensor* noise, uint64_t seed, Param param, bool clip, const at::Tensor& out) {
  if (x_t.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_t.scalar_type(), "ddpm_kernels_step", [&] {
    StepArgs<scalar_t> a;
    a.x_t = x_t.const_data_ptr<scalar_t>();
    a.mo = mo.const_data_ptr<scalar_t>();
    a.noise = noise ? noise->const_data_ptr<scalar_t>() : nullptr;
    a.out = out.mutable_data_ptr<scalar_t>();
    a.t = t.const_data_ptr<int64_t>();
    a.table = table.const_data_ptr<typename Lanes<scalar_t>::acc_t>();
    a.T = table.size(1);
    a.numel = x_t.numel();
    a.N = a.numel / x_t.size(0);
    a.seed = seed;
    with_param(param, [&](auto P) {
      with_bool(clip, [&](auto C) { step_kernel<scalar_t, kMode, decltype(P)::value, decltype(C)::value>(a); });
    });
  });
}

// The key of one call's in-kernel noise: one 64-bit draw, so the same generator state gives the same noise
// and the generator advances like any other CPU sampling call.
uint64_t draw_seed(std::optional<at::Generator> generator) {
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(generator, at::detail::getDefaultCPUGenerator());
  std::lock_guard<std::mutex> lock(gen->mutex_);
  return gen->random64();
}

// ------------------------------------------------------------------------------------------- sampler steps
// ddim_step / ddpm_step: per-sample coefficients derived in float64 from alphas_cumprod[t], [t_prev]
// (csrc/sampler_coefficients.h), then one pass over the data in float32 (float64) lanes.
enum class NoiseMode { kNone, kGiven, kRandom };

template <typename scalar_t>
struct SamplerArgs {
  const scalar_t* x_t;
  const scalar_t* mo;  // model_output; sample b's prediction at b * mo_stride, its variance channels N later
  const scalar_t* noise;
  scalar_t* out;
  scalar_t* x0;  // nullptr unless return_pred_x0
  const int64_t* t;
  const int64_t* t_prev;
  const double* table64;
  int64_t T, numel, N, mo_stride;
  double eta, clip_range;
  bool set_alpha_to_one, clip, use_clipped;
  Variance variance;
  NoiseMode noise_mode;
  uint64_t seed;
};

template <typename scalar_t, SamplerOp kOp, Param kParam>
void sampler_kernel(const SamplerArgs<scalar_t>& a) {
  using L = Lanes<scalar_t>;
  using acc_t = typename L::acc_t;
  using AVec = typename L::AVec;
  parallel_blocks(a.numel, [&](int64_t blk0, int64_t blk1) {
    auto noise = std::make_unique<BlockNoise<L>>();
    noise->seed = a.seed;
    for_each_segment(blk0, blk1, a.numel, a.N, [&](int64_t b, int64_t i, int64_t stop) {
      acc_t c[kSamplerSlots];
      if constexpr (kOp == SamplerOp::kDdim) {
        ddim_coefficients<acc_t>(a.table64, a.T, a.t[b], a.t_prev[b], a.eta, a.set_alpha_to_one, c);
      } else {
        ddpm_coefficients<acc_t>(a.table64, a.T, a.t[b], a.t_prev[b], a.variance, c);
      }
      const AVec at(c[kAT]), st(c[kST]), ra(c[kRA]), rs(c[kRS]), c4(c[4]), c5(c[5]), c6(c[6]);
      const AVec mask(c[kDdpmMask]), min_log(c[kDdpmMinLog]), max_log(c[kDdpmMaxLog]);
      const AVec lo(static_cast<acc_t>(-a.clip_range)), hi(static_cast<acc_t>(a.clip_range));
      const AVec one(acc_t(1)), half(acc_t(0.5));
      const bool learned = is_learned(a.variance) && kOp == SamplerOp::kDdpm;
      // element i of x_t pairs with mo_b[i] (and the variance channel mo_b[i + N])
      const scalar_t* mo_b = a.mo + b * (a.mo_stride - a.N);
      AVec xv[L::kVecs], mv[L::kVecs], vv[L::kVecs], zv[L::kVecs], x0v[L::kVecs];
      for (; i < stop; i += L::size()) {
        const int64_t n = std::min<int64_t>(L::size(), stop - i);
        L::load(a.x_t + i, xv, n);
        L::load(mo_b + i, mv, n);
        if (learned) L::load(mo_b + i + a.N, vv, n);
        if (a.noise_mode == NoiseMode::kGiven) {
          L::load(a.noise + i, zv, n);
        } else if (a.noise_mode == NoiseMode::kRandom) {
          noise->get(i, zv);
        }
        for (int k = 0; k < L::kVecs; ++k) {
          const AVec x = xv[k], mo = mv[k];
          AVec x0, eps;
          if constexpr (kParam == Param::kEps) {
            x0 = ra * x - rs * mo;
            eps = mo;
          } else if constexpr (kParam == Param::kX0) {
            x0 = mo;
            if constexpr (kOp == SamplerOp::kDdim) eps = (x - at * mo) / st;
          } else {
            x0 = at * x - st * mo;
            if constexpr (kOp == SamplerOp::kDdim) eps = at * mo + st * x;
          }
          if (a.clip) x0 = clampv(x0, lo, hi);
          AVec r;
          if constexpr (kOp == SamplerOp::kDdim) {
            if (a.use_clipped) eps = (x - at * x0) / st;
            r = c4 * x0 + c5 * eps;
            if (a.noise_mode != NoiseMode::kNone) r = r + c6 * zv[k];
          } else {
            r = c4 * x0 + c5 * x;
            AVec sd;
            if (a.variance == Variance::kLearned) {
              sd = mask * expv(half * vv[k]);
            } else if (a.variance == Variance::kLearnedRange) {
              const AVec frac = (vv[k] + one) * half;
              sd = mask * expv(half * (frac * max_log + (one - frac) * min_log));
            } else {
              sd = c6;  // [t > 0] std, per sample
            }
            r = r + sd * zv[k];
          }
          xv[k] = r;
          x0v[k] = x0;
        }
        L::store(a.out + i, xv, n);
        if (a.x0 != nullptr) L::store(a.x0 + i, x0v, n);
      }
    });
  });
}

// ------------------------------------------------------------------------------------------------ loss
// Elements per reduction chunk: partial sums are kept per (sample, chunk) in float64, so the result does
// not depend on the thread count, and the float32 lane accumulators sum at most a few hundred terms.
constexpr int64_t kLossChunk = 4096;

// d = model_output - target over elements [i, i + n), the target by parameterization: noise (eps), x_start
// (x0), or tx x_start + tn noise (v, tx and tn from loss_coefficients). Zero in the lanes past a partial load.
template <typename L, Param kParam, typename scalar_t>
C10_ALWAYS_INLINE void loss_diffs(const scalar_t* mo, const scalar_t* xs, const scalar_t* nz, int64_t i, int64_t n,
                                  const typename L::AVec& tx, const typename L::AVec& tn, typename L::AVec* d) {
  using AVec = typename L::AVec;
  AVec mv[L::kVecs], xv[L::kVecs], nv[L::kVecs];
  L::load(mo + i, mv, n);
  if constexpr (kParam != Param::kEps) L::load(xs + i, xv, n);
  if constexpr (kParam != Param::kX0) L::load(nz + i, nv, n);
  for (int k = 0; k < L::kVecs; ++k) {
    AVec target;
    if constexpr (kParam == Param::kEps) target = nv[k];
    else if constexpr (kParam == Param::kX0) target = xv[k];
    else target = madd(tx, xv[k], tn * nv[k]);
    d[k] = mv[k] - target;
  }
}

template <typename scalar_t, Param kParam, bool kL1>
void loss_partials(const scalar_t* mo, const scalar_t* xs, const scalar_t* nz, const int64_t* t,
                   const typename Lanes<scalar_t>::acc_t* table, int64_t T, int64_t B, int64_t N, double* partial,
                   int64_t chunks) {
  using L = Lanes<scalar_t>;
  using acc_t = typename L::acc_t;
  using AVec = typename L::AVec;
  at::parallel_for(0, B * chunks, std::max<int64_t>(1, 32768 / kLossChunk), [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t b = c / chunks;
      const LossCoef<acc_t> lc = loss_coefficients<acc_t>(kParam, table, T, t[b]);
      const AVec tx(lc.tgt_x), tn(lc.tgt_n);
      int64_t i = b * N + (c % chunks) * kLossChunk;
      const int64_t stop = std::min(i + kLossChunk, (b + 1) * N);
      AVec acc[L::kVecs], d[L::kVecs];
      for (int k = 0; k < L::kVecs; ++k) acc[k] = AVec(acc_t(0));
      for (; i < stop; i += L::size()) {
        loss_diffs<L, kParam>(mo, xs, nz, i, std::min<int64_t>(L::size(), stop - i), tx, tn, d);
        for (int k = 0; k < L::kVecs; ++k) acc[k] = kL1 ? acc[k] + absv(d[k]) : madd(d[k], d[k], acc[k]);
      }
      double s = 0;
      for (int k = 0; k < L::kVecs; ++k) s += hsum(acc[k]);
      partial[c] = s;
    }
  });
}

// d/d model_output of (loss, loss_simple, loss_vlb) contracted with their incoming gradients:
//   grad_i = [g_loss (w_simple + w_elbo lvlb_b) + g_simple + g_vlb lvlb_b] / (B N) * dl(d_i),
//   dl(d) = 2 d (l2) or sign(d) (l1), d = model_output - target.
template <typename scalar_t, Param kParam, bool kL1>
void loss_backward_impl(const scalar_t* mo, const scalar_t* xs, const scalar_t* nz, const int64_t* t,
                        const typename Lanes<scalar_t>::acc_t* table, int64_t T, int64_t numel, int64_t N,
                        const std::vector<typename Lanes<scalar_t>::acc_t>& scale, scalar_t* grad) {
  using L = Lanes<scalar_t>;
  using acc_t = typename L::acc_t;
  using AVec = typename L::AVec;
  parallel_blocks(numel, [&](int64_t blk0, int64_t blk1) {
    for_each_segment(blk0, blk1, numel, N, [&](int64_t b, int64_t i, int64_t stop) {
      const LossCoef<acc_t> lc = loss_coefficients<acc_t>(kParam, table, T, t[b]);
      const AVec tx(lc.tgt_x), tn(lc.tgt_n), s(scale[b]);
      AVec d[L::kVecs];
      for (; i < stop; i += L::size()) {
        const int64_t n = std::min<int64_t>(L::size(), stop - i);
        loss_diffs<L, kParam>(mo, xs, nz, i, n, tx, tn, d);
        for (int k = 0; k < L::kVecs; ++k) {
          if constexpr (kL1) {
            d[k] = s * signv(d[k]);
          } else {
            d[k] = s * (d[k] + d[k]);
          }
        }
        L::store(grad + i, d, n);
      }
    });
  });
}

// ---------------------------------------------------------------------------------------- entry points
// The backend half of csrc/host_ops.h: called after the checks, with the outputs allocated.
struct Kernels {
  static void pair(PairOp op, const at::Tensor& x, const at::Tensor& y, const at::Tensor& t,
                   const at::Tensor& table, const at::Tensor& out) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ddpm_kernels_pair", [&] {
      pair_impl<scalar_t>(op, x, y, t, table, out);
    });
  }

  static void q_sample_backward(const at::Tensor& grad, const at::Tensor& t, const at::Tensor& table,
                                const at::Tensor& gx, const at::Tensor& gn) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "q_sample_backward", [&] {
      q_sample_backward_impl<scalar_t>(grad, t, table, gx, gn);
    });
  }

  static void mean_variance(const at::Tensor& x_t, const at::Tensor& t, const at::Tensor& mo,
                            const at::Tensor& table, Param param, bool clip, const at::Tensor& mean,
                            const at::Tensor& var, const at::Tensor& log_var) {
    run_step<StepMode::kMean>(x_t, t, mo, table, nullptr, 0, param, clip, mean);
    variances(t, table, var, log_var);
  }

  static void p_sample(const at::Tensor& x_t, const at::Tensor& t, const at::Tensor& mo, const at::Tensor& table,
                       Param param, bool clip, const at::Tensor* noise, std::optional<at::Generator> generator,
                       const at::Tensor& out) {
    if (noise != nullptr) {
      run_step<StepMode::kSampleNoise>(x_t, t, mo, table, noise, 0, param, clip, out);
    } else {
      const uint64_t seed = draw_seed(std::move(generator));
      run_step<StepMode::kSampleRandom>(x_t, t, mo, table, nullptr, seed, param, clip, out);
    }
  }

  static void sampler_step(const SamplerStep& s, const at::Tensor& x_t, const at::Tensor& t,
                           const at::Tensor& t_prev, const at::Tensor& model_output, const at::Tensor& table64,
                           const at::Tensor* noise, std::optional<at::Generator> generator, const at::Tensor* x0,
                           const at::Tensor& out) {
    NoiseMode mode = NoiseMode::kNone;
    uint64_t seed = 0;
    if (noise != nullptr) {
      mode = NoiseMode::kGiven;
    } else if (s.add_noise) {
      // p_sample's scheme, so a step and a p_sample from the same generator state draw the same normals.
      seed = draw_seed(std::move(generator));
      mode = NoiseMode::kRandom;
    }
    if (x_t.numel() == 0) return;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_t.scalar_type(), "ddpm_kernels_sampler_step", [&] {
      SamplerArgs<scalar_t> a;
      a.x_t = x_t.const_data_ptr<scalar_t>();
      a.mo = model_output.const_data_ptr<scalar_t>();
      a.noise = noise != nullptr ? noise->const_data_ptr<scalar_t>() : nullptr;
      a.out = out.mutable_data_ptr<scalar_t>();
      a.x0 = x0 != nullptr ? x0->mutable_data_ptr<scalar_t>() : nullptr;
      a.t = t.const_data_ptr<int64_t>();
      a.t_prev = t_prev.const_data_ptr<int64_t>();
      a.table64 = table64.const_data_ptr<double>();
      a.T = table64.size(1);
      a.numel = x_t.numel();
      a.N = a.numel / x_t.size(0);
      a.mo_stride = s.learned ? 2 * a.N : a.N;
      a.eta = s.eta;
      a.clip_range = s.clip_range;
      a.set_alpha_to_one = s.set_alpha_to_one;
      a.clip = s.clip;
      a.use_clipped = s.use_clipped;
      a.variance = s.variance;
      a.noise_mode = mode;
      a.seed = seed;
      with_param(s.param, [&](auto P) {
        if (s.op == SamplerOp::kDdim) {
          sampler_kernel<scalar_t, SamplerOp::kDdim, decltype(P)::value>(a);
        } else {
          sampler_kernel<scalar_t, SamplerOp::kDdpm, decltype(P)::value>(a);
        }
      });
    });
  }

  static void diffusion_loss(const at::Tensor& model_output, const at::Tensor& x_start, const at::Tensor& noise,
                             const at::Tensor& t, const at::Tensor& table, Param param, bool l1,
                             double l_simple_weight, double original_elbo_weight, const at::Tensor& loss,
                             const at::Tensor& loss_simple, const at::Tensor& loss_vlb) {
    const int64_t B = model_output.size(0), N = model_output.numel() / B, T = table.size(1);
    const int64_t chunks = (N + kLossChunk - 1) / kLossChunk;
    std::vector<double> partial(B * chunks, 0.0);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, model_output.scalar_type(), "diffusion_loss", [&] {
      using acc_t = typename Lanes<scalar_t>::acc_t;
      const acc_t* tab = table.const_data_ptr<acc_t>();
      const int64_t* tp = t.const_data_ptr<int64_t>();
      with_param(param, [&](auto P) {
        with_bool(l1, [&](auto L1) {
          loss_partials<scalar_t, decltype(P)::value, decltype(L1)::value>(
              model_output.const_data_ptr<scalar_t>(), x_start.const_data_ptr<scalar_t>(),
              noise.const_data_ptr<scalar_t>(), tp, tab, T, B, N, partial.data(), chunks);
        });
      });
      double simple = 0, vlb = 0;
      for (int64_t b = 0; b < B; ++b) {
        double s = 0;
        for (int64_t c = 0; c < chunks; ++c) s += partial[b * chunks + c];
        const double per_sample = s / static_cast<double>(N);
        simple += per_sample;
        vlb += static_cast<double>(loss_coefficients<acc_t>(param, tab, T, tp[b]).weight) * per_sample;
      }
      simple /= static_cast<double>(B);
      vlb /= static_cast<double>(B);
      *loss_simple.mutable_data_ptr<scalar_t>() = static_cast<scalar_t>(simple);
      *loss_vlb.mutable_data_ptr<scalar_t>() = static_cast<scalar_t>(vlb);
      *loss.mutable_data_ptr<scalar_t>() =
          static_cast<scalar_t>(l_simple_weight * simple + original_elbo_weight * vlb);
    });
  }

  static void diffusion_loss_backward(const at::Tensor& grad_loss, const at::Tensor& grad_loss_simple,
                                      const at::Tensor& grad_loss_vlb, const at::Tensor& model_output,
                                      const at::Tensor& x_start, const at::Tensor& noise, const at::Tensor& t,
                                      const at::Tensor& table, Param param, bool l1, double l_simple_weight,
                                      double original_elbo_weight, const at::Tensor& grad) {
    const int64_t B = model_output.size(0), numel = model_output.numel(), N = numel / B, T = table.size(1);
    const double g_loss = grad_loss.item<double>(), g_simple = grad_loss_simple.item<double>(),
                 g_vlb = grad_loss_vlb.item<double>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, model_output.scalar_type(), "diffusion_loss_backward",
                                    [&] {
      using acc_t = typename Lanes<scalar_t>::acc_t;
      const acc_t* tab = table.const_data_ptr<acc_t>();
      const int64_t* tp = t.const_data_ptr<int64_t>();
      std::vector<acc_t> scale(B);
      for (int64_t b = 0; b < B; ++b) {
        const double w = static_cast<double>(loss_coefficients<acc_t>(param, tab, T, tp[b]).weight);
        scale[b] = static_cast<acc_t>((g_loss * (l_simple_weight + original_elbo_weight * w) + g_simple + g_vlb * w) /
                                      (static_cast<double>(B) * static_cast<double>(N)));
      }
      with_param(param, [&](auto P) {
        with_bool(l1, [&](auto L1) {
          loss_backward_impl<scalar_t, decltype(P)::value, decltype(L1)::value>(
              model_output.const_data_ptr<scalar_t>(), x_start.const_data_ptr<scalar_t>(),
              noise.const_data_ptr<scalar_t>(), tp, tab, T, numel, N, scale, grad.mutable_data_ptr<scalar_t>());
        });
      });
    });
  }
};

// TORCH_LIBRARY_IMPL(ddpm_kernels, CPU, m), registered only if no other build of these kernels already serves
// the CPU key: the per-ISA libraries are alternatives, and loading a second one (by importing it directly)
// must not silently replace the kernels the process is using.
struct CpuRegistration {
  std::unique_ptr<torch::Library> lib;
  CpuRegistration() {
    auto op = c10::Dispatcher::singleton().findOp(c10::OperatorName("ddpm_kernels::p_sample", ""));
    if (op.has_value() && op->hasKernelForDispatchKey(c10::DispatchKey::CPU)) return;
    lib = std::make_unique<torch::Library>(torch::Library::IMPL, "ddpm_kernels", c10::DispatchKey::CPU, __FILE__,
                                           __LINE__);
    register_kernels<Kernels>(*lib);
  }
};
const CpuRegistration cpu_registration;

}  // namespace
}  // namespace cpu
}  // namespace ddpm
