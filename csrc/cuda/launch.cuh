// The CUDA backend's loop: one kernel template runs every elementwise family's functor (csrc/family.h).
//
// Coefficients are gathered on the device from the schedule table by t (never passed as scalars, so a
// captured CUDA graph reads current values), math in float32 (float64 for float64 data), 128-bit loads and
// stores when every pointer is aligned and a packet never spans two samples, int64 indexing, launched on the
// current stream. A call whose float operands have different dtypes (docs/design.md, "Mixed precision") runs
// the same kernels in float32 with the functors' MixedPtrs policy (csrc/mixed.h): PacketIO<float, W> reads each
// such operand in its own dtype, W of its elements per packet. In-kernel noise is the noise stream of
// csrc/philox.h (the CPU kernels compile the same code), keyed by the torch CUDA generator's seed at its Philox
// offset, taken through PhiloxCudaState (the CUDA-graph-safe way torch's own random kernels use) and advanced by
// a fixed 4 per call.
//
// The grid walks the data in tiles: per turn a block covers one contiguous tile of kThreads * U slices of W
// elements. The samples a tile touches get their coefficients computed once per tile, one thread per sample,
// into shared memory (a sampler step's float64 derivation included: it never runs per element), and the
// slices find their sample by stepping the tile's start (sample, offset) by the grid's span, so no thread
// divides by the sample size per element. One launch per op, no allocation.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Generator.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/cuda/PhiloxUtils.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <mutex>
#include <optional>
#include <type_traits>

#include "../family.h"
#include "../mixed.h"
#include "../philox.h"

namespace ddpm::cuda {

constexpr int kThreads = 256;

template <typename T, int V>
struct alignas(sizeof(T) * V) Packet {
  T val[V];
};

// W elements at p of type T as float32 (one packet: p aligned to W elements), and back, rounded once.
template <typename T, int W>
DDPM_LANE Packet<float, W> packet_to_float(const void* p) {
  const Packet<T, W> q = *reinterpret_cast<const Packet<T, W>*>(p);
  Packet<float, W> r;
  DDPM_UNROLL
  for (int k = 0; k < W; ++k) r.val[k] = static_cast<float>(q.val[k]);
  return r;
}
template <typename T, int W>
DDPM_LANE void packet_from_float(void* p, const Packet<float, W>& v) {
  Packet<T, W> q;
  DDPM_UNROLL
  for (int k = 0; k < W; ++k) q.val[k] = static_cast<T>(v.val[k]);
  *reinterpret_cast<Packet<T, W>*>(p) = q;
}

// A mixed operand's W elements in float32, and a mixed output's store: the branch on the operand's dtype in a
// function of its own (not inlined on the device). Inlined, the per-call dtype fields are loop-invariant in the
// kernels' loops, and the compiler specialises whole loops per combination of the operands' dtypes (3^4 copies
// of a step's body): compile time and code size explode for no speed that matters here.
template <int W>
__host__ __device__ __noinline__ Packet<float, W> mixed_load(MixedPtr p) {
  switch (p.type) {
    case OperandType::kHalf: return packet_to_float<at::Half, W>(p.p);
    case OperandType::kBFloat16: return packet_to_float<at::BFloat16, W>(p.p);
    default: return packet_to_float<float, W>(p.p);
  }
}
template <int W>
__host__ __device__ __noinline__ void mixed_store(MixedMutPtr p, Packet<float, W> v) {
  switch (p.type) {
    case OperandType::kHalf: return packet_from_float<at::Half, W>(p.p, v);
    case OperandType::kBFloat16: return packet_from_float<at::BFloat16, W>(p.p, v);
    default: return packet_from_float<float, W>(p.p, v);
  }
}

// The IO policy of csrc/family.h: a slice is W elements of one sample; W > 1 is one packet load / store,
// which needs the pointer aligned to W elements.
template <typename scalar_t, int W>
struct PacketIO {
  using V = at::opmath_type<scalar_t>;
  static constexpr int kLanes = W;
  static DDPM_LANE void load(const scalar_t* p, V* v, int64_t) {
    const Packet<scalar_t, W> q = *reinterpret_cast<const Packet<scalar_t, W>*>(p);
    DDPM_UNROLL
    for (int k = 0; k < W; ++k) v[k] = static_cast<V>(q.val[k]);
  }
  static DDPM_LANE void store(scalar_t* p, const V* v, int64_t) {
    Packet<scalar_t, W> q;
    DDPM_UNROLL
    for (int k = 0; k < W; ++k) q.val[k] = static_cast<scalar_t>(v[k]);
    *reinterpret_cast<Packet<scalar_t, W>*>(p) = q;
  }

  // A mixed call's operands (csrc/mixed.h; scalar_t is float): W elements of the operand's own dtype, one packet
  // of W floats, halves or bfloat16s (the pointer aligned to W of its elements, packets_fit), converted exactly
  // to float32; a MixedMutPtr output (the loss gradients) rounded once to its dtype. Used by mixed calls only.
  static DDPM_LANE void load(MixedPtr p, V* v, int64_t) {
    static_assert(std::is_same_v<scalar_t, float>, "a mixed call computes in float32");
    const Packet<float, W> q = mixed_load<W>(p);
    DDPM_UNROLL
    for (int k = 0; k < W; ++k) v[k] = q.val[k];
  }
  static DDPM_LANE void store(MixedMutPtr p, const V* v, int64_t) {
    static_assert(std::is_same_v<scalar_t, float>, "a mixed call computes in float32");
    Packet<float, W> q;
    DDPM_UNROLL
    for (int k = 0; k < W; ++k) q.val[k] = v[k];
    mixed_store<W>(p, q);
  }
};

// f(Tag<scalar_t>, Tag<Ptrs>) for a call of one dtype `st` (its dispatch: every kernel dtype, SamePtrs), or for
// a mixed call (`mixed`, csrc/mixed.h's mixed_operands): float32 and MixedPtrs.
template <typename F>
void dispatch_operands(at::ScalarType st, bool mixed, const F& f) {
  if (mixed) return f(Tag<float>(), Tag<MixedPtrs>());
  DDPM_DISPATCH_FLOATING(st, "ddpm_kernels_cuda", [&] { f(Tag<scalar_t>(), Tag<SamePtrs<scalar_t>>()); });
}

inline int sm_count() {
  static int cached[256] = {0};
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  if (device < 0 || device >= 256) device = 0;
  if (cached[device] == 0) {
    int sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    cached[device] = sms;
  }
  return cached[device];
}

// Blocks of kThreads for `work` items: enough to fill the device a few times over, the rest in grid-stride
// turns.
inline int64_t grid_for(int64_t work) {
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  return std::max<int64_t>(1, std::min<int64_t>(blocks, int64_t(sm_count()) * 8));
}

// The sum of v over the block (blockDim.x a multiple of 32, at most kThreads), valid in thread 0; `shared`
// holds kThreads / 32 values. Every thread of the block must call it.
template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t v, acc_t* shared) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = threadIdx.x < blockDim.x / 32 ? shared[threadIdx.x] : acc_t(0);
  if (warp == 0)
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  __syncthreads();
  return v;  // valid in thread 0
}

// A tensor a launch reads or writes, as packets_fit sees it: its address (nullptr: an absent operand) and its
// element size (a mixed call's operands differ in it).
struct Operand {
  const void* p;
  int64_t size;
  Operand(const void* p_, int64_t size_) : p(p_), size(size_) {}
  Operand(const at::Tensor& t) : Operand(&t) {}
  Operand(const at::Tensor* t)
      : p(t != nullptr ? t->const_data_ptr() : nullptr), size(t != nullptr ? t->element_size() : 1) {}
};

// Whether slices of W elements can be packets: N a multiple of W (no packet spans two samples) and every
// operand aligned to a packet of W of its own elements.
inline bool packets_fit(int W, int64_t N, std::initializer_list<Operand> operands) {
  if (N % W != 0) return false;
  for (const Operand& o : operands)
    if (o.p != nullptr && reinterpret_cast<uintptr_t>(o.p) % (o.size * W) != 0) return false;
  return true;
}

// The in-kernel noise marker, and the normals one thread holds for its slice.
struct PhiloxNoise {};

template <typename acc_t, int W>
struct RegisterNoise {
  acc_t z[W];
  static constexpr DDPM_HD bool present() { return true; }
  template <typename IO>
  DDPM_LANE void get(int64_t, int64_t, typename IO::V* out) const {
    static_assert(IO::kLanes == W, "one normal per lane");
    DDPM_UNROLL
    for (int k = 0; k < W; ++k) out[k] = z[k];
  }
};

// The walk of the data, fixed per launch: the grid advances by `span` elements per turn, which is `samples`
// whole samples and `rem` more elements.
struct Walk {
  int64_t numel, N, span, samples, rem;
};

inline Walk make_walk(int64_t numel, int64_t N, int64_t span) {
  return numel == 0 ? Walk{0, 1, span, 0, 0} : Walk{numel, N, span, span / N, span % N};
}

// o / N for 0 <= o < N + tile, tile the elements of one block's turn (<= 2^14): o >= 2N only when N < tile,
// where 32-bit division is exact.
__device__ __forceinline__ int64_t sample_offset(int64_t o, int64_t N) {
  if (o < N) return 0;
  if (o - N < N) return 1;
  return static_cast<uint32_t>(o) / static_cast<uint32_t>(N);
}

// Runs functor f over the data, U slices of W elements per thread per turn; Z is the noise source (NoNoise,
// GivenNoise, or PhiloxNoise: then W == 4, U == 1, and a thread's slice is 4 consecutive elements, whose
// normals are one stream counter (csrc/philox.h) when they lie in one 4-element group of one sample, i.e.
// when N % 4 == 0; else each element takes its own group's output).
// kPackets: slices are packets inside one sample; else each element of a slice is handled on its own.
// Threads first write the per-sample outputs of samples [0, B_out).
template <typename scalar_t, typename F, typename Z, int W, int U, bool kPackets>
__global__ void __launch_bounds__(kThreads)
    family_kernel(F f, Z z, Walk w, int64_t B_out, at::PhiloxCudaState philox, int64_t first_sample) {
  using acc_t = at::opmath_type<scalar_t>;
  using Coef = typename F::Coef;
  constexpr bool kPhilox = std::is_same_v<Z, PhiloxNoise>;
  static_assert(!kPhilox || (W == 4 && U == 1), "one stream counter per 4-element slice");
  constexpr int64_t kTile = int64_t(kThreads) * U * W;
  __shared__ Coef cache[kThreads];

  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t b = tid; b < B_out; b += int64_t(gridDim.x) * blockDim.x) f.per_sample(b);
  if (w.numel == 0) return;
  StreamState st{0, 0, first_sample};  // first_sample: the call's sample_offset
  if constexpr (kPhilox) {
    const auto seeds = at::cuda::philox::unpack(philox);
    st.key = std::get<0>(seeds);
    st.offset = std::get<1>(seeds);
  }

  int64_t lo = int64_t(blockIdx.x) * kTile;  // the tile's first element: b_lo * N + r_lo
  int64_t b_lo = lo / w.N, r_lo = lo - b_lo * w.N;
  // `lo` is the same in every thread of the block, so all of them reach the barriers together.
  for (; lo < w.numel; lo += w.span) {
    const int64_t len = w.numel - lo < kTile ? w.numel - lo : kTile;
    // Samples b_lo .. b_lo + nb - 1 overlap the tile. Tiny samples (nb > kThreads): each thread derives its own.
    const int64_t nb = sample_offset(r_lo + len - 1, w.N) + 1;
    const bool cached = nb <= kThreads;
    if (cached) {
      if (threadIdx.x < nb) cache[threadIdx.x] = f.coef(b_lo + threadIdx.x);
      __syncthreads();
    }
    Coef c;
    int64_t c_sample = -1;
    const auto coef = [&](int64_t o) -> int64_t {  // the sample of tile offset o, its coefficients in c
      const int64_t db = sample_offset(r_lo + o, w.N);
      if (db != c_sample) {
        c = cached ? cache[db] : f.coef(b_lo + db);
        c_sample = db;
      }
      return b_lo + db;
    };
    DDPM_UNROLL
    for (int u = 0; u < U; ++u) {
      const int64_t o = (int64_t(u) * kThreads + threadIdx.x) * W;
      if (o >= len) break;
      if constexpr (kPackets) {
        const int64_t b = coef(o);
        if constexpr (kPhilox) {
          // packets: N % 4 == 0, so the slice is group (lo + o - b N) / 4 of sample b
          float z4[4];
          stream_normal4(st, b, (lo + o - b * w.N) / 4, z4);
          RegisterNoise<acc_t, W> zr{{z4[0], z4[1], z4[2], z4[3]}};
          f.template apply<PacketIO<scalar_t, W>>(b, lo + o, W, c, zr);
        } else {
          f.template apply<PacketIO<scalar_t, W>>(b, lo + o, W, c, z);
        }
      } else {
        float z4[4];
        int64_t zb = -1, zq = -1;  // the sample and group z4 holds
        DDPM_UNROLL
        for (int k = 0; k < W; ++k) {
          if (o + k >= len) break;
          const int64_t b = coef(o + k);
          if constexpr (kPhilox) {
            const int64_t e = lo + o + k - b * w.N;
            if (b != zb || e / 4 != zq) {
              zb = b;
              zq = e / 4;
              stream_normal4(st, b, zq, z4);
            }
            RegisterNoise<acc_t, 1> zr{{static_cast<acc_t>(z4[e % 4])}};
            f.template apply<PacketIO<scalar_t, 1>>(b, lo + o + k, 1, c, zr);
          } else {
            f.template apply<PacketIO<scalar_t, 1>>(b, lo + o + k, 1, c, z);
          }
        }
      }
    }
    if (cached) __syncthreads();
    b_lo += w.samples;
    r_lo += w.rem;
    if (r_lo >= w.N) {
      r_lo -= w.N;
      ++b_lo;
    }
  }
}

// Runs f over numel elements (N per sample, numel > 0 or B_out > 0) with noise source z (NoNoise or
// GivenNoise), packets of 128 bits of scalar_t when the operands allow (a mixed call: 4 elements, each operand's
// own); per-sample outputs for samples [0, B_out).
template <typename scalar_t, typename F, typename Z>
void launch_family(const F& f, Z z, int64_t numel, int64_t N, int64_t B_out, std::initializer_list<Operand> ptrs,
                   Operand noise) {
  if (numel == 0 && B_out == 0) return;
  constexpr int kPacket = 16 / sizeof(scalar_t), kU = 4;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto launch = [&](auto kernel, int W) {
    const int64_t blocks = grid_for(std::max<int64_t>(numel / (W * kU), B_out));
    kernel<<<blocks, kThreads, 0, stream>>>(f, z, make_walk(numel, N, blocks * kThreads * kU * W), B_out,
                                            at::PhiloxCudaState(), int64_t(0));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (numel > 0 && packets_fit(kPacket, N, ptrs) && packets_fit(kPacket, N, {noise})) {
    launch(family_kernel<scalar_t, F, Z, kPacket, kU, true>, kPacket);
  } else {
    launch(family_kernel<scalar_t, F, Z, 1, kU, true>, 1);
  }
}

// The Philox offset advance of one in-kernel noise draw, whatever the batch size (ddpm_kernels/_stream.py's
// CUDA_OFFSET_STEP): the stream's counters hold the element group and the sample themselves, so one offset per
// call keeps every call's counters apart; torch reserves offsets in multiples of 4.
constexpr uint64_t kOffsetStep = 4;

// Runs f over numel elements with in-kernel noise, keyed by `generator`'s (or the device's default
// generator's) seed at its Philox offset, which advances by kOffsetStep — also for an empty tensor, as the
// other backends consume the generator on every drawing call. Groups of 4 are packets when `ptrs` allow.
inline at::PhiloxCudaState take_stream_state(std::optional<at::Generator> generator) {
  auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(generator, at::cuda::detail::getDefaultCUDAGenerator());
  std::lock_guard<std::mutex> lock(gen->mutex_);
  return gen->philox_cuda_state(kOffsetStep);
}

template <typename scalar_t, typename F>
void launch_family_philox(const F& f, int64_t numel, int64_t N, std::optional<at::Generator> generator,
                          int64_t sample_offset, std::initializer_list<Operand> ptrs) {
  const at::PhiloxCudaState philox = take_stream_state(std::move(generator));
  if (numel == 0) return;
  const int64_t groups = (numel + 3) / 4;
  const int64_t blocks = grid_for(groups);
  const Walk w = make_walk(numel, N, blocks * kThreads * 4);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (packets_fit(4, N, ptrs)) {
    family_kernel<scalar_t, F, PhiloxNoise, 4, 1, true><<<blocks, kThreads, 0, stream>>>(f, {}, w, 0, philox, sample_offset);
  } else {
    family_kernel<scalar_t, F, PhiloxNoise, 4, 1, false><<<blocks, kThreads, 0, stream>>>(f, {}, w, 0, philox, sample_offset);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Runs f over numel elements, N per sample, `ptrs` its data tensors, without noise; per-sample outputs for
// samples [0, B_out).
template <typename scalar_t, typename F>
void run_family(const F& f, int64_t numel, int64_t N, std::initializer_list<Operand> ptrs, int64_t B_out = 0) {
  launch_family<scalar_t>(f, NoNoise(), numel, N, B_out, ptrs, static_cast<const at::Tensor*>(nullptr));
}

// The same for a family with a noise term: the given tensor (read through Ptrs, csrc/family.h), else in-kernel
// noise when `draw`, else none. Per-sample outputs come with the noiseless launches only.
template <typename scalar_t, typename Ptrs = SamePtrs<scalar_t>, typename F>
void run_family(const F& f, int64_t numel, int64_t N, std::initializer_list<Operand> ptrs,
                const at::Tensor* noise, bool draw, std::optional<at::Generator> generator, int64_t sample_offset,
                int64_t B_out = 0) {
  if (noise != nullptr) {
    launch_family<scalar_t>(f, GivenNoise<scalar_t, typename Ptrs::in>{Ptrs::input(*noise)}, numel, N, B_out, ptrs,
                            noise);
  } else if (draw) {
    TORCH_INTERNAL_ASSERT(B_out == 0, "per-sample outputs are written by the noiseless launches");
    launch_family_philox<scalar_t>(f, numel, N, std::move(generator), sample_offset, ptrs);
  } else {
    run_family<scalar_t>(f, numel, N, ptrs, B_out);
  }
}

}  // namespace ddpm::cuda
