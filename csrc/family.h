// What a kernel family is, for both backends.
//
// The ops share a few shapes of math (pair ops, posterior/p_sample, sampler steps, loss); each shape is one
// family, written once as a struct of the data pointers and options of a call (its "kernel functor"), in the
// family's header:
//
//   using Coef = ...;                          per-sample coefficients, a plain struct of scalars
//   Coef coef(int64_t b) const;                sample b's coefficients, gathered / derived from the table
//   void per_sample(int64_t b) const;          per-sample outputs (var / log_var), else nothing
//   template <typename IO, typename Z>
//   void apply(int64_t b, int64_t i, int64_t n, const Coef& c, Z& z) const;
//                                              elements [i, i + n) of sample b, one IO slice
//
// A backend supplies only the loop and the IO policy: csrc/cpu/loops.h walks sample-homogeneous segments on
// at::vec::Vectorized lanes (IO = Lanes<scalar_t>: a slice is one or two vectors, n may be short at a
// segment's tail); csrc/cuda/launch.cuh walks tiles of the grid, caching the coefficients of the samples a
// tile touches in shared memory (IO = PacketIO<scalar_t, W>: a slice is W elements, one 128-bit load where
// alignment allows). So the CPU kernels run exactly the arithmetic of the CUDA kernels, on another lane type.
//
// IO::V is the lane type (float / double, or Vectorized<float / double> on the CPU) and IO::kLanes the
// number of lanes in a slice; IO::load(p, v, n) / IO::store(p, v, n) convert from / to the data's dtype, so
// every value is computed in float32 (float64 for float64 data) and rounded once at the store.
//
// Flags that select code paths (parameterization, clipping, sampler, l1) are members of a type the functor
// is templated on: the CPU passes std::integral_constant (one instantiation per value, branches folded at
// compile time), the CUDA kernels pass the runtime enum (one instantiation, uniform branches), keeping GPU
// compile time and binary size down. The same source serves both.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

// DDPM_HD: shared by host and device code. DDPM_LANE: per-element code, always inlined into the lane loops
// (a call per slice would redo the per-sample broadcasts the loops hoist, and measured 1.5-2x slower).
#if defined(__CUDACC__)
#define DDPM_HD __host__ __device__ __forceinline__
#define DDPM_LANE __host__ __device__ __forceinline__
#define DDPM_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define DDPM_HD inline
#define DDPM_LANE __attribute__((always_inline)) inline
#define DDPM_UNROLL
#else
#define DDPM_HD inline
#define DDPM_LANE inline
#define DDPM_UNROLL
#endif

// The data dtypes of every kernel; the lanes are float32 for the reduced ones.
#define DDPM_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

namespace ddpm {

// The operations per-element math needs beyond + - * /, per lane type. Scalars here; the CPU adds
// at::vec::Vectorized (csrc/cpu/loops.h).
template <typename V, typename Enable = void>
struct LaneOps;

template <typename V>
struct LaneOps<V, std::enable_if_t<std::is_floating_point_v<V>>> {
  using scalar = V;
  static constexpr int kWidth = 1;  // elements per lane value
  static DDPM_LANE V splat(V s) { return s; }
  static DDPM_LANE V loadu(const V* p) { return *p; }
  static DDPM_LANE V madd(V a, V b, V c) { return a * b + c; }
  // NaN stays NaN, as under torch.clamp (fmin/fmax would drop it): two selects, which vectorize (a nested
  // select became a branch per element).
  static DDPM_LANE V clamp(V x, V lo, V hi) {
#if defined(__CUDA_ARCH__)
    const V y = x < lo ? lo : x;
    return hi < y ? hi : y;
#else
    return std::min(std::max(x, lo), hi);
#endif
  }
  static DDPM_LANE V abs(V x) { return x < V(0) ? -x : x; }
  static DDPM_LANE V exp(V x) {
#if defined(__CUDA_ARCH__)
    return ::exp(x);
#else
    return std::exp(x);
#endif
  }
  // 0 at 0, as torch's abs backward.
  static DDPM_LANE V sign(V x) { return static_cast<V>((x > V(0)) - (x < V(0))); }
};

template <typename V>
using lane_scalar_t = typename LaneOps<V>::scalar;

// A per-sample scalar on every lane; loop-invariant, so compilers hoist the broadcast out of the lane loops.
template <typename V>
DDPM_LANE V splat(lane_scalar_t<V> s) {
  return LaneOps<V>::splat(s);
}
// a * b + c: one fused instruction where the hardware has FMA.
template <typename V>
DDPM_LANE V madd(const V& a, const V& b, const V& c) {
  return LaneOps<V>::madd(a, b, c);
}
template <typename V>
DDPM_LANE V clamp_keep_nan(const V& x, const V& lo, const V& hi) {
  return LaneOps<V>::clamp(x, lo, hi);
}
template <typename V>
DDPM_LANE V lane_abs(const V& x) {
  return LaneOps<V>::abs(x);
}
template <typename V>
DDPM_LANE V lane_exp(const V& x) {
  return LaneOps<V>::exp(x);
}
template <typename V>
DDPM_LANE V lane_sign(const V& x) {
  return LaneOps<V>::sign(x);
}

// ------------------------------------------------------------------------------------------ noise sources
// The z of a step: `present()` says whether there is a noise term; `get<IO>(i, n, z)` fills one slice.
struct NoNoise {
  static constexpr DDPM_LANE bool present() { return false; }
  template <typename IO>
  DDPM_LANE void get(int64_t, int64_t, typename IO::V*) const {}
};

// How a functor reads its operands and writes its outputs: `in` / `out` pointers of the call's one dtype,
// taken from a tensor by input() / output(); `model_in` / model_input() for the model outputs a step reads
// (csrc/guidance.h), the same here. Calls with operands of different dtypes use MixedPtrs or AutocastPtrs instead
// (csrc/mixed.h: each operand read in its own dtype; docs/design.md, "Mixed precision").
template <typename scalar_t>
struct SamePtrs {
  using in = const scalar_t*;
  using out = scalar_t*;
  using model_in = in;
  static in input(const at::Tensor& t) { return t.const_data_ptr<scalar_t>(); }
  static out output(const at::Tensor& t) { return t.mutable_data_ptr<scalar_t>(); }
  static model_in model_input(const at::Tensor& t) { return input(t); }
};

// One element's value (a policy's `in` pointer; a MixedPtr has its own overload, csrc/mixed.h).
template <typename T>
DDPM_HD T value_at(const T* p) {
  return *p;
}

// Noise passed in as a tensor of the data's layout (Ptr: its pointer, SamePtrs::in or csrc/mixed.h's MixedPtr).
template <typename scalar_t, typename Ptr = const scalar_t*>
struct GivenNoise {
  Ptr noise;
  static constexpr DDPM_LANE bool present() { return true; }
  template <typename IO>
  DDPM_LANE void get(int64_t i, int64_t n, typename IO::V* z) const {
    IO::load(noise + i, z, n);
  }
};

// Per-sample outputs: none (most families).
struct NoPerSampleOutputs {
  DDPM_LANE void per_sample(int64_t) const {}
};

}  // namespace ddpm
