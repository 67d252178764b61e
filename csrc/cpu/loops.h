// The CPU backend's loop: at::vec::Vectorized lanes, work split with at::parallel_for, every family's
// functor (csrc/family.h) run over sample-homogeneous segments of the data.
//
// setup.py compiles csrc/cpu once per x86 instruction set (baseline, AVX2, AVX-512) into separate libraries;
// ddpm_kernels/extension.py loads the widest one torch.backends.cpu.get_cpu_capability() allows, as PyTorch
// does with its own per-ISA kernels. Vectorized<T> picks its implementation from the CPU_CAPABILITY_* macro
// setup.py defines for each build, and everything here lives in a namespace named after the build.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <tuple>
#include <type_traits>

#include "../coefficients.h"
#include "../mixed.h"

#if defined(CPU_CAPABILITY_DEFAULT) && (defined(__x86_64__) || defined(_M_X64))
// The x86-64 baseline build runs plain element loops, which GCC vectorizes for SSE2 (with
// -fno-trapping-math for the clamp). The generic Vectorized<T> of a baseline build keeps its lanes in
// memory and measured several times slower. Other architectures' baseline Vectorized is native (NEON).
#define DDPM_SCALAR_LANES 1
#endif

namespace ddpm {

// The lane operations of csrc/family.h on Vectorized<float> / Vectorized<double>.
template <typename T>
struct LaneOps<at::vec::Vectorized<T>> {
  using V = at::vec::Vectorized<T>;
  using scalar = T;
  static constexpr int kWidth = V::size();
  static C10_ALWAYS_INLINE V splat(T s) { return V(s); }
  static C10_ALWAYS_INLINE V loadu(const T* p) { return V::loadu(p); }
  static C10_ALWAYS_INLINE V madd(const V& a, const V& b, const V& c) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
    return at::vec::fmadd(a, b, c);
#else
    return a * b + c;
#endif
  }
  static C10_ALWAYS_INLINE V clamp(const V& x, const V& lo, const V& hi) { return at::vec::clamp(x, lo, hi); }
  static C10_ALWAYS_INLINE V abs(const V& x) { return x.abs(); }
  static C10_ALWAYS_INLINE V exp(const V& x) { return x.exp(); }
  static C10_ALWAYS_INLINE V sign(const V& d) {
    const V zero(T(0)), one(T(1));
    return ((d > zero) & one) - ((d < zero) & one);
  }
};

}  // namespace ddpm

namespace ddpm::cpu::CPU_CAPABILITY {

using at::vec::Vectorized;

// Unit of parallel work, and the size of the in-kernel noise's per-sample blocks (csrc/cpu/noise.h): noise
// depends only on the key, the sample and the element within it, so results do not depend on the thread count.
constexpr int64_t kBlock = 256;
// Blocks per parallel task (~32K elements): below that, threading costs more than it saves.
constexpr int64_t kGrainBlocks = 128;

// The IO policy of csrc/family.h: a slice is size() elements, as kLanes lanes of type V.
#if defined(DDPM_SCALAR_LANES)
// One element at a time, in acc_t.
template <typename scalar_t>
struct Lanes {
  using acc_t = at::opmath_type<scalar_t>;
  using V = acc_t;
  static constexpr int kLanes = 1;
  static constexpr int64_t size() { return 1; }
  static C10_ALWAYS_INLINE void load(const scalar_t* p, V* v, int64_t) { v[0] = static_cast<acc_t>(*p); }
  static C10_ALWAYS_INLINE void store(scalar_t* p, const V* v, int64_t) { *p = static_cast<scalar_t>(v[0]); }
  static C10_ALWAYS_INLINE void load_acc(const acc_t* p, V* v) { v[0] = *p; }
};
#else
// Partial vectors (tails) stay out of line so the full-vector path inlines into the loops. The stored vector
// is taken by value: a reference would take the address of the caller's lane array, which then lives on the
// stack through the whole loop (GCC keeps a two-vector slice, a float16 / bfloat16 or mixed one, in memory).
template <typename V, typename T>
C10_NOINLINE V load_partial(const T* p, int64_t n) {
  return V::loadu(p, n);
}
template <typename V, typename T>
C10_NOINLINE void store_partial(V v, T* p, int64_t n) {
  v.store(p, static_cast<int>(n));
}

// A vector-width slice of a tensor loaded as float32 (float64) lanes: one Vectorized<acc_t> for
// float/double data, two for float16/bfloat16 (converted to float32 on load, rounded once on store).
template <typename scalar_t, typename Enable = void>
struct Lanes {
  using acc_t = scalar_t;
  using V = Vectorized<acc_t>;
  static constexpr int kLanes = 1;
  static constexpr int64_t size() { return V::size(); }
  static C10_ALWAYS_INLINE void load(const scalar_t* p, V* v, int64_t n) {
    v[0] = C10_LIKELY(n == size()) ? V::loadu(p) : load_partial<V>(p, n);
  }
  static C10_ALWAYS_INLINE void store(scalar_t* p, const V* v, int64_t n) {
    if (C10_LIKELY(n == size())) v[0].store(p); else store_partial(v[0], p, n);
  }
  // The same slice read from an acc_t buffer (the in-kernel noise), always full vectors.
  static C10_ALWAYS_INLINE void load_acc(const acc_t* p, V* v) { v[0] = V::loadu(p); }
};

template <typename scalar_t>
struct Lanes<scalar_t, std::enable_if_t<at::vec::is_reduced_floating_point_v<scalar_t>>> {
  using acc_t = float;
  using V = Vectorized<float>;
  using SVec = Vectorized<scalar_t>;
  static constexpr int kLanes = 2;
  static constexpr int64_t size() { return SVec::size(); }
  static C10_ALWAYS_INLINE void load(const scalar_t* p, V* v, int64_t n) {
    const SVec s = C10_LIKELY(n == size()) ? SVec::loadu(p) : load_partial<SVec>(p, n);
    std::tie(v[0], v[1]) = at::vec::convert_to_float<scalar_t>(s);
  }
  static C10_ALWAYS_INLINE void store(scalar_t* p, const V* v, int64_t n) {
    const SVec s = at::vec::convert_from_float<scalar_t>(v[0], v[1]);
    if (C10_LIKELY(n == size())) s.store(p); else store_partial(s, p, n);
  }
  static C10_ALWAYS_INLINE void load_acc(const acc_t* p, V* v) {
    v[0] = V::loadu(p);
    v[1] = V::loadu(p + V::size());
  }
};
#endif

// ------------------------------------------------------------------------------------------ mixed dtypes
// A call whose float operands have different dtypes reads each in its own (csrc/mixed.h: MixedPtr, MixedPtrs) and
// computes in float32 on the lanes below.
#if defined(DDPM_SCALAR_LANES)
// The IO policy of a mixed call: one element at a time, in float32.
struct MixedLanes {
  using acc_t = float;
  using V = float;
  static constexpr int kLanes = 1;
  static constexpr int64_t size() { return 1; }
  static C10_ALWAYS_INLINE void load(const float* p, V* v, int64_t) { v[0] = *p; }
  static C10_ALWAYS_INLINE void load(const at::Half* p, V* v, int64_t) { v[0] = static_cast<float>(*p); }
  static C10_ALWAYS_INLINE void load(const at::BFloat16* p, V* v, int64_t) { v[0] = static_cast<float>(*p); }
  static C10_ALWAYS_INLINE void load(MixedPtr p, V* v, int64_t) {
    switch (p.type) {
      case OperandType::kHalf: v[0] = static_cast<float>(*reinterpret_cast<const at::Half*>(p.p)); return;
      case OperandType::kBFloat16: v[0] = static_cast<float>(*reinterpret_cast<const at::BFloat16*>(p.p)); return;
      default: v[0] = *reinterpret_cast<const float*>(p.p);
    }
  }
  static C10_ALWAYS_INLINE void store(MixedMutPtr p, const V* v, int64_t) {
    switch (p.type) {
      case OperandType::kHalf: *reinterpret_cast<at::Half*>(p.p) = static_cast<at::Half>(v[0]); return;
      case OperandType::kBFloat16: *reinterpret_cast<at::BFloat16*>(p.p) = static_cast<at::BFloat16>(v[0]); return;
      default: *reinterpret_cast<float*>(p.p) = v[0];
    }
  }
  static C10_ALWAYS_INLINE void store(float* p, const V* v, int64_t) { *p = v[0]; }
  static C10_ALWAYS_INLINE void load_acc(const float* p, V* v) { v[0] = *p; }
};
#else
// The IO policy of a mixed call: a slice is two Vectorized<float> (the width of a float16 / bfloat16 vector),
// each operand loaded in its own dtype and converted (float16 / bfloat16 exactly), outputs rounded once.
struct MixedLanes {
  using acc_t = float;
  using V = Vectorized<float>;
  static constexpr int kLanes = 2;
  static constexpr int64_t W = V::size();
  static constexpr int64_t size() { return 2 * W; }
  static C10_ALWAYS_INLINE void load(const float* p, V* v, int64_t n) {
    if (C10_LIKELY(n == size())) {
      v[0] = V::loadu(p);
      v[1] = V::loadu(p + W);
    } else {
      v[0] = n >= W ? V::loadu(p) : load_partial<V>(p, n);
      v[1] = n > W ? load_partial<V>(p + W, n - W) : V(0.f);
    }
  }
  // an operand of the autocast policy's typed 16-bit model outputs (AutocastPtrs)
  static C10_ALWAYS_INLINE void load(const at::Half* p, V* v, int64_t n) { Lanes<at::Half>::load(p, v, n); }
  static C10_ALWAYS_INLINE void load(const at::BFloat16* p, V* v, int64_t n) { Lanes<at::BFloat16>::load(p, v, n); }
  static C10_ALWAYS_INLINE void load(MixedPtr p, V* v, int64_t n) {
    switch (p.type) {
      case OperandType::kHalf: return Lanes<at::Half>::load(reinterpret_cast<const at::Half*>(p.p), v, n);
      case OperandType::kBFloat16:
        return Lanes<at::BFloat16>::load(reinterpret_cast<const at::BFloat16*>(p.p), v, n);
      default: return load(reinterpret_cast<const float*>(p.p), v, n);
    }
  }
  static C10_ALWAYS_INLINE void store(float* p, const V* v, int64_t n) {
    if (C10_LIKELY(n == size())) {
      v[0].store(p);
      v[1].store(p + W);
    } else if (n <= W) {
      store_partial(v[0], p, n);
    } else {
      v[0].store(p);
      store_partial(v[1], p + W, n - W);
    }
  }
  static C10_ALWAYS_INLINE void store(MixedMutPtr p, const V* v, int64_t n) {
    switch (p.type) {
      case OperandType::kHalf: return Lanes<at::Half>::store(reinterpret_cast<at::Half*>(p.p), v, n);
      case OperandType::kBFloat16: return Lanes<at::BFloat16>::store(reinterpret_cast<at::BFloat16*>(p.p), v, n);
      default: return store(reinterpret_cast<float*>(p.p), v, n);
    }
  }
  static C10_ALWAYS_INLINE void load_acc(const float* p, V* v) {
    v[0] = V::loadu(p);
    v[1] = V::loadu(p + W);
  }
};
#endif

// f(Tag<scalar_t>, Tag<Ptrs>, Tag<IO>) for a call of one dtype `st` (its dispatch: every kernel dtype), or
// for a mixed call (`mixed`): float32, MixedPtrs, MixedLanes.
template <typename F>
void dispatch_operands(at::ScalarType st, bool mixed, const F& f) {
  if (mixed) return f(Tag<float>(), Tag<MixedPtrs>(), Tag<MixedLanes>());
  DDPM_DISPATCH_FLOATING(st, "ddpm_kernels", [&] {
    f(Tag<scalar_t>(), Tag<SamePtrs<scalar_t>>(), Tag<Lanes<scalar_t>>());
  });
}

// dispatch_operands for a step whose `model` operands (its model outputs; nullptr: absent) may be the autocast
// mix: all of one 16-bit float dtype M with every `data` operand float32 (nullptr: absent) runs typed,
// f(Tag<float>, Tag<AutocastPtrs<M>>, Tag<MixedLanes>) (no dtype tag read per slice); any other call as
// dispatch_operands runs it. The functor must read its model outputs through Ptrs::model_in.
template <typename F>
void dispatch_model_operands(at::ScalarType st, bool mixed, std::initializer_list<const at::Tensor*> model,
                             std::initializer_list<const at::Tensor*> data, const F& f) {
  if (mixed) {
    at::ScalarType m = at::ScalarType::Undefined;
    bool autocast = true;
    for (const at::Tensor* t : model) {
      if (t == nullptr) continue;
      if (m == at::ScalarType::Undefined) m = t->scalar_type();
      autocast = autocast && t->scalar_type() == m;
    }
    for (const at::Tensor* t : data) autocast = autocast && (t == nullptr || t->scalar_type() == at::kFloat);
    if (autocast && m == at::kBFloat16) return f(Tag<float>(), Tag<AutocastPtrs<at::BFloat16>>(), Tag<MixedLanes>());
    if (autocast && m == at::kHalf) return f(Tag<float>(), Tag<AutocastPtrs<at::Half>>(), Tag<MixedLanes>());
  }
  dispatch_operands(st, mixed, f);
}

// The sum of a lane's values, in float64.
template <typename V>
inline double hsum(const V& v) {
  if constexpr (std::is_floating_point_v<V>) {
    return static_cast<double>(v);
  } else {
    constexpr int64_t W = V::size();
    alignas(64) typename V::value_type lanes[W];
    v.store(lanes);
    if constexpr (W % 4 == 0) {
      // four independent chains: the flushes of a reduction wait on this sum
      double s[4] = {0, 0, 0, 0};
      for (int64_t j = 0; j < W; j += 4)
        for (int q = 0; q < 4; ++q) s[q] += static_cast<double>(lanes[j + q]);
      return (s[0] + s[1]) + (s[2] + s[3]);
    } else {
      double s = 0;
      for (int64_t j = 0; j < W; ++j) s += static_cast<double>(lanes[j]);
      return s;
    }
  }
}

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

// Calls f with the noise source itself: `noise` is NoNoise, or anything with visit() (csrc/cpu/noise.h).
template <typename Z, typename F>
void visit_noise(const Z& noise, const F& f) {
  if constexpr (std::is_same_v<Z, NoNoise>) {
    NoNoise none;
    f(none);
  } else {
    noise.visit(f);
  }
}

// Runs a family's functor over numel > 0 elements, N per sample: the coefficients once per segment, then
// one slice at a time. Each parallel task gets its own noise source from `noise`.
template <typename L, typename F, typename Z = NoNoise>
void run_family_io(const F& f, int64_t numel, int64_t N, const Z& noise = Z()) {
  parallel_blocks(numel, [&](int64_t blk0, int64_t blk1) {
    visit_noise(noise, [&](auto& z) {
      for_each_segment(blk0, blk1, numel, N, [&](int64_t b, int64_t i, int64_t stop) {
        const typename F::Coef c = f.coef(b);
        for (; i < stop; i += L::size()) f.template apply<L>(b, i, std::min<int64_t>(L::size(), stop - i), c, z);
      });
    });
  });
}

template <typename scalar_t, typename F, typename Z = NoNoise>
void run_family(const F& f, int64_t numel, int64_t N, const Z& noise = Z()) {
  run_family_io<Lanes<scalar_t>>(f, numel, N, noise);
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

// f(P, B) with both flags as constants: the parameterization and a family's bool (clip, l1).
template <typename F>
void with_param_and_bool(Param param, bool value, const F& f) {
  with_param(param, [&](auto P) { with_bool(value, [&](auto B) { f(P, B); }); });
}

}  // namespace ddpm::cpu::CPU_CAPABILITY
