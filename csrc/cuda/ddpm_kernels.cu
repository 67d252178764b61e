// CUDA kernels of every ddpm_kernels operator.
//
// One pass over the data per op: coefficients gathered on the device from the schedule table by t (never
// passed as scalars, so a captured CUDA graph reads current values), math in float32 (float64 for float64
// data), 128-bit loads and stores when every pointer is 16-byte aligned and a vector never spans two
// samples, int64 indexing, launched on the current stream. In-kernel noise is Philox4x32-10 (curand) with
// seed and offset from the torch CUDA generator via PhiloxCudaState, the CUDA-graph-safe way torch's own
// random kernels use.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/cuda/PhiloxUtils.cuh>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <curand_kernel.h>
#include <torch/library.h>

#include <algorithm>
#include <mutex>

#include "../checks.h"
#include "../coefficients.h"
#include "../host_ops.h"
#include "../sampler_coefficients.h"

namespace ddpm {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename T, int V>
struct alignas(sizeof(T) * V) Packet {
  T val[V];
};

template <int V, typename T>
__device__ __forceinline__ void load(const T* p, T (&r)[V]) {
  const Packet<T, V> v = *reinterpret_cast<const Packet<T, V>*>(p);
#pragma unroll
  for (int k = 0; k < V; ++k) r[k] = v.val[k];
}

template <int V, typename T>
__device__ __forceinline__ void store(T* p, const T (&r)[V]) {
  Packet<T, V> v;
#pragma unroll
  for (int k = 0; k < V; ++k) v.val[k] = r[k];
  *reinterpret_cast<Packet<T, V>*>(p) = v;
}

int sm_count() {
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

int64_t grid_for(int64_t work) {
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  return std::max<int64_t>(1, std::min<int64_t>(blocks, int64_t(sm_count()) * 8));
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Elements per 128-bit packet, when every pointer is aligned and a packet never spans two samples; else 1.
template <typename scalar_t>
int vector_width(int64_t N, std::initializer_list<const void*> ptrs) {
  constexpr int V = 16 / sizeof(scalar_t);
  if (N % V != 0) return 1;
  for (const void* p : ptrs)
    if (p != nullptr && !aligned16(p)) return 1;
  return V;
}

// Grid-stride loop over packets of V elements; f(i, b) handles elements [i, i + V) of sample b.
template <int V, typename F>
__global__ void per_sample_kernel(int64_t numel, int64_t N, F f) {
  const int64_t npackets = numel / V;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t g = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; g < npackets; g += stride) {
    const int64_t i = g * V;
    f.template apply<V>(i, i / N);
  }
}

// V is 16 / sizeof(scalar_t) (one 128-bit packet) or 1: only those two widths are instantiated per dtype.
template <typename scalar_t, typename F>
void launch_per_sample(int V, int64_t numel, int64_t N, const F& f) {
  if (numel == 0) return;
  constexpr int kPacket = 16 / sizeof(scalar_t);
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (V == kPacket) {
    per_sample_kernel<kPacket><<<grid_for(numel / kPacket), kThreads, 0, stream>>>(numel, N, f);
  } else {
    per_sample_kernel<1><<<grid_for(numel), kThreads, 0, stream>>>(numel, N, f);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// In-kernel noise: thread `tid` owns 4-element groups tid, tid + stride, ...; its Philox subsequence is tid and
// each group takes one curand_normal4 (one Philox call, four normals). f.element(i, b, z) writes element i of
// sample b given its normal z. p_sample and the sampler steps share this, so the same generator state gives
// them the same normals.
template <typename F>
__global__ void philox_normal_kernel(F f, int64_t numel, int64_t N, at::PhiloxCudaState philox) {
  using acc_t = typename F::acc_t;
  const auto seeds = at::cuda::philox::unpack(philox);
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  curandStatePhilox4_32_10_t state;
  curand_init(std::get<0>(seeds), tid, std::get<1>(seeds), &state);
  const int64_t groups = (numel + 3) / 4;
  for (int64_t g = tid; g < groups; g += stride) {
    const float4 z4 = curand_normal4(&state);
    const float z[4] = {z4.x, z4.y, z4.z, z4.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int64_t i = g * 4 + k;
      if (i < numel) f.element(i, i / N, acc_t(z[k]));
    }
  }
}

// Runs philox_normal_kernel over numel > 0 elements (N per sample) on the current stream, taking the Philox
// seed and offset from `generator` (or the device's default generator) and advancing it by what the threads
// consume: 4 32-bit values per curand_normal4 call, one call per group a thread owns.
template <typename F>
void launch_philox_normal(const F& f, int64_t numel, int64_t N, std::optional<at::Generator> generator) {
  const int64_t groups = (numel + 3) / 4;
  const int64_t blocks = grid_for(groups);
  const uint64_t calls_per_thread = uint64_t((groups + blocks * kThreads - 1) / (blocks * kThreads));
  auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(generator, at::cuda::detail::getDefaultCUDAGenerator());
  at::PhiloxCudaState philox;
  {
    std::lock_guard<std::mutex> lock(gen->mutex_);
    philox = gen->philox_cuda_state(calls_per_thread * 4);
  }
  philox_normal_kernel<F><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(f, numel, N, philox);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ------------------------------------------------------------------------------------------ two-operand ops
template <typename scalar_t>
struct PairFn {
  using acc_t = at::opmath_type<scalar_t>;
  PairOp op;
  const scalar_t* x;
  const scalar_t* y;
  scalar_t* out;
  const int64_t* t;
  const acc_t* table;
  int64_t T;
  template <int V>
  __device__ __forceinline__ void apply(int64_t i, int64_t b) const {
    const Pair<acc_t> c = pair_coefficients<acc_t>(op, table, T, t[b]);
    scalar_t xv[V], yv[V];
    load<V>(x + i, xv);
    load<V>(y + i, yv);
#pragma unroll
    for (int k = 0; k < V; ++k) xv[k] = static_cast<scalar_t>(c.a * acc_t(xv[k]) + c.b * acc_t(yv[k]));
    store<V>(out + i, xv);
  }
};

template <typename scalar_t>
struct QSampleBackwardFn {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* g;
  scalar_t* gx;
  scalar_t* gn;
  const int64_t* t;
  const acc_t* table;
  int64_t T;
  template <int V>
  __device__ __forceinline__ void apply(int64_t i, int64_t b) const {
    const Pair<acc_t> c = pair_coefficients<acc_t>(PairOp::kQSample, table, T, t[b]);
    scalar_t gv[V], a[V], n[V];
    load<V>(g + i, gv);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      a[k] = static_cast<scalar_t>(c.a * acc_t(gv[k]));
      n[k] = static_cast<scalar_t>(c.b * acc_t(gv[k]));
    }
    store<V>(gx + i, a);
    store<V>(gn + i, n);
  }
};

// ----------------------------------------------------------------------------------- posterior / sampling
template <typename acc_t>
__device__ __forceinline__ acc_t clamp_unit(acc_t v) {
  // NaN stays NaN (as torch.clamp): fmin/fmax would drop it.
  return v < acc_t(-1) ? acc_t(-1) : (v > acc_t(1) ? acc_t(1) : v);
}

template <typename acc_t>
__device__ __forceinline__ acc_t step_mean(const Step<acc_t>& c, Param param, bool clip, acc_t x, acc_t mo) {
  acc_t x0 = param == Param::kX0 ? mo : c.x0_xt * x + c.x0_mo * mo;
  if (clip) x0 = clamp_unit(x0);
  return c.coef1 * x0 + c.coef2 * x;
}

// var / log_var for the first B threads of the grid (q_posterior, p_mean_variance).
template <typename acc_t>
__device__ __forceinline__ void write_variances(acc_t* var, acc_t* log_var, const int64_t* t, const acc_t* table,
                                                int64_t T, int64_t B) {
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (var != nullptr && tid < B) {
    var[tid] = gather<acc_t>(table, T, kPosteriorVariance, t[tid]);
    log_var[tid] = gather<acc_t>(table, T, kPosteriorLogVarianceClipped, t[tid]);
  }
}

// mean (and with noise given, the sample) of one step; `mo` is x_start for q_posterior (Param::kX0).
template <typename scalar_t>
struct StepFn {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x_t;
  const scalar_t* mo;
  const scalar_t* noise;  // nullptr: mean only
  scalar_t* out;
  const int64_t* t;
  const acc_t* table;
  int64_t T;
  Param param;
  bool clip;
  template <int V>
  __device__ __forceinline__ void apply(int64_t i, int64_t b) const {
    const Step<acc_t> c = step_coefficients<acc_t>(param, table, T, t[b]);
    scalar_t xv[V], mv[V], zv[V];
    load<V>(x_t + i, xv);
    load<V>(mo + i, mv);
    if (noise != nullptr) load<V>(noise + i, zv);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      acc_t r = step_mean(c, param, clip, acc_t(xv[k]), acc_t(mv[k]));
      if (noise != nullptr) r += c.sigma * acc_t(zv[k]);
      xv[k] = static_cast<scalar_t>(r);
    }
    store<V>(out + i, xv);
  }
  // One element of p_sample with its in-kernel normal z.
  __device__ __forceinline__ void element(int64_t i, int64_t b, acc_t z) const {
    const Step<acc_t> c = step_coefficients<acc_t>(param, table, T, t[b]);
    out[i] = static_cast<scalar_t>(step_mean(c, param, clip, acc_t(x_t[i]), acc_t(mo[i])) + c.sigma * z);
  }
};

template <typename scalar_t>
__global__ void variances_kernel(at::opmath_type<scalar_t>* var, at::opmath_type<scalar_t>* log_var,
                                 const int64_t* t, const at::opmath_type<scalar_t>* table, int64_t T, int64_t B) {
  write_variances(var, log_var, t, table, T, B);
}

void run_step(const at::Tensor& x_t, const at::Tensor& t, const at::Tensor& mo, const at::Tensor& table,
              const at::Tensor* noise, Param param, bool clip, const at::Tensor& out, const at::Tensor* var,
              const at::Tensor* log_var) {
  c10::cuda::CUDAGuard guard(x_t.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_t.scalar_type(), "ddpm_kernels_step_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    StepFn<scalar_t> f{x_t.const_data_ptr<scalar_t>(), mo.const_data_ptr<scalar_t>(),
                       noise ? noise->const_data_ptr<scalar_t>() : nullptr, out.mutable_data_ptr<scalar_t>(),
                       t.const_data_ptr<int64_t>(), table.const_data_ptr<acc_t>(), table.size(1), param, clip};
    const int64_t numel = x_t.numel();
    const int64_t N = numel == 0 ? 1 : numel / x_t.size(0);
    launch_per_sample<scalar_t>(vector_width<scalar_t>(N, {f.x_t, f.mo, f.noise, f.out}), numel, N, f);
    if (var != nullptr && x_t.size(0) > 0) {
      const int64_t B = x_t.size(0);
      variances_kernel<scalar_t><<<(B + kThreads - 1) / kThreads, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          var->mutable_data_ptr<acc_t>(), log_var->mutable_data_ptr<acc_t>(), f.t, f.table, f.T, B);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

// ------------------------------------------------------------------------------------------------ loss
constexpr int kLossItems = 16;  // elements per thread per chunk: a chunk is kThreads * kLossItems elements
constexpr int64_t kLossChunk = int64_t(kThreads) * kLossItems;

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

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t loss_diff(const LossCoef<acc_t>& c, Param param, const scalar_t* mo,
                                           const scalar_t* xs, const scalar_t* nz, int64_t i) {
  acc_t target;
  if (param == Param::kEps) target = acc_t(nz[i]);
  else if (param == Param::kX0) target = acc_t(xs[i]);
  else target = c.tgt_x * acc_t(xs[i]) + c.tgt_n * acc_t(nz[i]);
  return acc_t(mo[i]) - target;
}

// The loss is summed in pieces: piece p = b * chunks + c is chunk c (kLossChunk elements, the last one shorter)
// of sample b, and block k of the grid sums pieces k, k + gridDim.x, ... into partial[p]. The batch is not a
// grid dimension (gridDim.y stops at 65535, and a batch may be larger). Fixed-size pieces and tree sums: the
// result does not depend on scheduling or on the grid size.
template <typename scalar_t>
__global__ void loss_partials_kernel(const scalar_t* mo, const scalar_t* xs, const scalar_t* nz, const int64_t* t,
                                     const at::opmath_type<scalar_t>* table, int64_t T, int64_t N, int64_t chunks,
                                     int64_t pieces, Param param, bool l1, at::opmath_type<scalar_t>* partial) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t shared[kThreads / 32];
  // p is the same for every thread of the block, so all of them reach block_sum's barriers together.
  for (int64_t p = blockIdx.x; p < pieces; p += gridDim.x) {
    const int64_t b = p / chunks, chunk = p - b * chunks;
    const LossCoef<acc_t> c = loss_coefficients<acc_t>(param, table, T, t[b]);
    const int64_t begin = b * N + chunk * kLossChunk;
    const int64_t end = begin + kLossChunk < (b + 1) * N ? begin + kLossChunk : (b + 1) * N;
    acc_t acc = 0;
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
      const acc_t d = loss_diff(c, param, mo, xs, nz, i);
      acc += l1 ? (d < acc_t(0) ? -d : d) : d * d;
    }
    acc = block_sum(acc, shared);
    if (threadIdx.x == 0) partial[p] = acc;
  }
}

// One block: per-sample means, then (loss, loss_simple, loss_vlb) in model_output's dtype.
template <typename scalar_t>
__global__ void loss_finish_kernel(const at::opmath_type<scalar_t>* partial, int64_t chunks, const int64_t* t,
                                   const at::opmath_type<scalar_t>* table, int64_t T, int64_t B, int64_t N,
                                   Param param, double w_simple, double w_elbo, scalar_t* loss,
                                   scalar_t* loss_simple, scalar_t* loss_vlb) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ double shared[kThreads / 32];
  double simple = 0, vlb = 0;
  for (int64_t b = threadIdx.x; b < B; b += blockDim.x) {
    double s = 0;
    for (int64_t c = 0; c < chunks; ++c) s += double(partial[b * chunks + c]);
    const double per_sample = s / double(N);
    simple += per_sample;
    vlb += double(loss_coefficients<acc_t>(param, table, T, t[b]).weight) * per_sample;
  }
  simple = block_sum(simple, shared);
  vlb = block_sum(vlb, shared);
  if (threadIdx.x == 0) {
    simple /= double(B);
    vlb /= double(B);
    *loss = static_cast<scalar_t>(w_simple * simple + w_elbo * vlb);
    *loss_simple = static_cast<scalar_t>(simple);
    *loss_vlb = static_cast<scalar_t>(vlb);
  }
}

template <typename scalar_t>
struct LossBackwardFn {
  using acc_t = at::opmath_type<scalar_t>;
  // Incoming gradients of (loss, loss_simple, loss_vlb): 0-d device tensors, read in the kernel (no host sync).
  const scalar_t* g_loss_p;
  const scalar_t* g_simple_p;
  const scalar_t* g_vlb_p;
  const scalar_t* mo;
  const scalar_t* xs;
  const scalar_t* nz;
  scalar_t* out;
  const int64_t* t;
  const acc_t* table;
  int64_t T, B, N;
  Param param;
  bool l1;
  acc_t w_simple, w_elbo;
  template <int V>
  __device__ __forceinline__ void apply(int64_t i, int64_t b) const {
    const LossCoef<acc_t> c = loss_coefficients<acc_t>(param, table, T, t[b]);
    const acc_t g_loss = acc_t(*g_loss_p), g_simple = acc_t(*g_simple_p), g_vlb = acc_t(*g_vlb_p);
    const acc_t scale = (g_loss * (w_simple + w_elbo * c.weight) + g_simple + g_vlb * c.weight) / (acc_t(B) * acc_t(N));
    scalar_t r[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const acc_t d = loss_diff(c, param, mo, xs, nz, i + k);
      const acc_t dl = l1 ? acc_t((d > acc_t(0)) - (d < acc_t(0))) : d + d;
      r[k] = static_cast<scalar_t>(scale * dl);
    }
    store<V>(out + i, r);
  }
};

// ------------------------------------------------------------------------------------------- sampler steps
// ddim_step / ddpm_step. Two launches on the current stream: a (B,)-thread kernel derives each sample's
// coefficients in float64 from alphas_cumprod[t], [t_prev] of the float64 table (csrc/sampler_coefficients.h)
// and rounds them once into a (B, kSamplerSlots) buffer of the compute dtype; the elementwise kernel reads
// them per packet (L1/L2 resident). Float64 math never runs per element, which matters on GPUs with slow
// float64, and nothing is read on the host, so the step stays CUDA-graph safe.
template <typename acc_t>
__global__ void sampler_coefficients_kernel(SamplerOp op, const int64_t* t, const int64_t* t_prev,
                                            const double* table64, int64_t T, int64_t B, double eta,
                                            bool set_alpha_to_one, Variance variance, acc_t* coef) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  if (op == SamplerOp::kDdim) {
    ddim_coefficients<acc_t>(table64, T, t[b], t_prev[b], eta, set_alpha_to_one, coef + b * kSamplerSlots);
  } else {
    ddpm_coefficients<acc_t>(table64, T, t[b], t_prev[b], variance, coef + b * kSamplerSlots);
  }
}

// One element of a step; writes the (clipped) x0 prediction to x0.
template <typename acc_t>
__device__ __forceinline__ acc_t sampler_element(const acc_t* c, const SamplerStep& fl, acc_t clip_range, acc_t x,
                                                 acc_t mo, acc_t v, acc_t z, acc_t& x0) {
  if (fl.param == Param::kEps) {
    x0 = c[kRA] * x - c[kRS] * mo;
  } else if (fl.param == Param::kX0) {
    x0 = mo;
  } else {
    x0 = c[kAT] * x - c[kST] * mo;
  }
  // where-style clamp: a NaN x0 stays NaN, as under torch.clamp
  if (fl.clip) x0 = x0 < -clip_range ? -clip_range : (x0 > clip_range ? clip_range : x0);
  if (fl.op == SamplerOp::kDdim) {
    acc_t eps;
    if (fl.use_clipped) {
      eps = (x - c[kAT] * x0) / c[kST];
    } else if (fl.param == Param::kEps) {
      eps = mo;
    } else if (fl.param == Param::kX0) {
      eps = (x - c[kAT] * mo) / c[kST];
    } else {
      eps = c[kAT] * mo + c[kST] * x;
    }
    acc_t r = c[kDdimAPrev] * x0 + c[kDdimDir] * eps;
    if (fl.add_noise) r += c[kDdimSigma] * z;
    return r;
  }
  acc_t sd;
  if (fl.variance == Variance::kLearned) {
    sd = c[kDdpmMask] * exp(acc_t(0.5) * v);
  } else if (fl.variance == Variance::kLearnedRange) {
    const acc_t frac = (v + acc_t(1)) * acc_t(0.5);
    sd = c[kDdpmMask] * exp(acc_t(0.5) * (frac * c[kDdpmMaxLog] + (acc_t(1) - frac) * c[kDdpmMinLog]));
  } else {
    sd = c[kDdpmStd];
  }
  return c[kDdpmCoefX0] * x0 + c[kDdpmCoefXt] * x + sd * z;
}

template <typename scalar_t>
struct SamplerFn {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x_t;
  const scalar_t* mo;  // sample b's prediction at b * (N + mo_extra), its variance channels N later
  const scalar_t* noise;
  scalar_t* out;
  scalar_t* x0;  // nullptr unless return_pred_x0
  const acc_t* coef;
  int64_t N, mo_extra;
  acc_t clip_range;
  SamplerStep fl;

  template <int V>
  __device__ __forceinline__ void apply(int64_t i, int64_t b) const {
    acc_t c[kSamplerSlots];
#pragma unroll
    for (int k = 0; k < kSamplerSlots; ++k) c[k] = coef[b * kSamplerSlots + k];
    const int64_t m = i + b * mo_extra;
    scalar_t xv[V], mv[V], vv[V], zv[V], x0v[V];
    load<V>(x_t + i, xv);
    load<V>(mo + m, mv);
    if (fl.learned) load<V>(mo + m + N, vv);
    if (noise != nullptr) load<V>(noise + i, zv);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      acc_t x0_;
      const acc_t v = fl.learned ? acc_t(vv[k]) : acc_t(0);
      const acc_t z = noise != nullptr ? acc_t(zv[k]) : acc_t(0);
      xv[k] = static_cast<scalar_t>(sampler_element(c, fl, clip_range, acc_t(xv[k]), acc_t(mv[k]), v, z, x0_));
      x0v[k] = static_cast<scalar_t>(x0_);
    }
    store<V>(out + i, xv);
    if (x0 != nullptr) store<V>(x0 + i, x0v);
  }

  __device__ __forceinline__ void element(int64_t i, int64_t b, acc_t z) const {
    acc_t c[kSamplerSlots];
#pragma unroll
    for (int k = 0; k < kSamplerSlots; ++k) c[k] = coef[b * kSamplerSlots + k];
    const int64_t m = i + b * mo_extra;
    const acc_t v = fl.learned ? acc_t(mo[m + N]) : acc_t(0);
    acc_t x0_;
    out[i] = static_cast<scalar_t>(sampler_element(c, fl, clip_range, acc_t(x_t[i]), acc_t(mo[m]), v, z, x0_));
    if (x0 != nullptr) x0[i] = static_cast<scalar_t>(x0_);
  }
};

// ---------------------------------------------------------------------------------------- entry points
// The backend half of csrc/host_ops.h: called after the checks, with the outputs allocated; each launches on
// the current stream of the data's device.
struct Kernels {
  static void pair(PairOp op, const at::Tensor& x, const at::Tensor& y, const at::Tensor& t,
                   const at::Tensor& table, const at::Tensor& out) {
    c10::cuda::CUDAGuard guard(x.device());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ddpm_kernels_pair_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      PairFn<scalar_t> f{op,
                         x.const_data_ptr<scalar_t>(),
                         y.const_data_ptr<scalar_t>(),
                         out.mutable_data_ptr<scalar_t>(),
                         t.const_data_ptr<int64_t>(),
                         table.const_data_ptr<acc_t>(),
                         table.size(1)};
      const int64_t N = x.numel() / x.size(0);
      launch_per_sample<scalar_t>(vector_width<scalar_t>(N, {f.x, f.y, f.out}), x.numel(), N, f);
    });
  }

  static void q_sample_backward(const at::Tensor& grad, const at::Tensor& t, const at::Tensor& table,
                                const at::Tensor& gx, const at::Tensor& gn) {
    c10::cuda::CUDAGuard guard(grad.device());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "q_sample_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      QSampleBackwardFn<scalar_t> f{grad.const_data_ptr<scalar_t>(), gx.mutable_data_ptr<scalar_t>(),
                                    gn.mutable_data_ptr<scalar_t>(), t.const_data_ptr<int64_t>(),
                                    table.const_data_ptr<acc_t>(), table.size(1)};
      const int64_t N = grad.numel() / grad.size(0);
      launch_per_sample<scalar_t>(vector_width<scalar_t>(N, {f.g, f.gx, f.gn}), grad.numel(), N, f);
    });
  }

  static void mean_variance(const at::Tensor& x_t, const at::Tensor& t, const at::Tensor& mo,
                            const at::Tensor& table, Param param, bool clip, const at::Tensor& mean,
                            const at::Tensor& var, const at::Tensor& log_var) {
    run_step(x_t, t, mo, table, nullptr, param, clip, mean, &var, &log_var);
  }

  static void p_sample(const at::Tensor& x_t, const at::Tensor& t, const at::Tensor& mo, const at::Tensor& table,
                       Param param, bool clip, const at::Tensor* noise, std::optional<at::Generator> generator,
                       const at::Tensor& out) {
    if (noise != nullptr) {
      run_step(x_t, t, mo, table, noise, param, clip, out, nullptr, nullptr);
      return;
    }
    const int64_t numel = x_t.numel();
    if (numel == 0) return;
    c10::cuda::CUDAGuard guard(x_t.device());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_t.scalar_type(), "p_sample_random_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      StepFn<scalar_t> f{x_t.const_data_ptr<scalar_t>(), mo.const_data_ptr<scalar_t>(), nullptr,
                         out.mutable_data_ptr<scalar_t>(), t.const_data_ptr<int64_t>(), table.const_data_ptr<acc_t>(),
                         table.size(1), param, clip};
      launch_philox_normal(f, numel, numel / x_t.size(0), generator);
    });
  }

  static void sampler_step(const SamplerStep& s, const at::Tensor& x_t, const at::Tensor& t,
                           const at::Tensor& t_prev, const at::Tensor& model_output, const at::Tensor& table64,
                           const at::Tensor* noise, std::optional<at::Generator> generator, const at::Tensor* x0,
                           const at::Tensor& out) {
    const int64_t numel = x_t.numel();
    if (numel == 0) return;
    c10::cuda::CUDAGuard guard(x_t.device());
    auto stream = c10::cuda::getCurrentCUDAStream();
    const int64_t B = x_t.size(0), N = numel / B;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_t.scalar_type(), "ddpm_kernels_sampler_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      at::Tensor coef =
          at::empty({B, int64_t(kSamplerSlots)}, x_t.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
      sampler_coefficients_kernel<acc_t><<<(B + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
          s.op, t.const_data_ptr<int64_t>(), t_prev.const_data_ptr<int64_t>(), table64.const_data_ptr<double>(),
          table64.size(1), B, s.eta, s.set_alpha_to_one, s.variance, coef.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      SamplerFn<scalar_t> f{x_t.const_data_ptr<scalar_t>(),
                            model_output.const_data_ptr<scalar_t>(),
                            noise != nullptr ? noise->const_data_ptr<scalar_t>() : nullptr,
                            out.mutable_data_ptr<scalar_t>(),
                            x0 != nullptr ? x0->mutable_data_ptr<scalar_t>() : nullptr,
                            coef.const_data_ptr<acc_t>(),
                            N,
                            s.learned ? N : 0,
                            static_cast<acc_t>(s.clip_range),
                            s};
      if (s.add_noise && noise == nullptr) {
        launch_philox_normal(f, numel, N, generator);
      } else {
        launch_per_sample<scalar_t>(vector_width<scalar_t>(N, {f.x_t, f.mo, f.noise, f.out, f.x0}), numel, N, f);
      }
    });
  }

  static void diffusion_loss(const at::Tensor& model_output, const at::Tensor& x_start, const at::Tensor& noise,
                             const at::Tensor& t, const at::Tensor& table, Param param, bool l1,
                             double l_simple_weight, double original_elbo_weight, const at::Tensor& loss,
                             const at::Tensor& loss_simple, const at::Tensor& loss_vlb) {
    const int64_t B = model_output.size(0), N = model_output.numel() / B;
    const int64_t chunks = (N + kLossChunk - 1) / kLossChunk, pieces = B * chunks;
    c10::cuda::CUDAGuard guard(model_output.device());  // first: sm_count() reads the current device
    // Enough blocks to fill the device a few times over; more pieces are taken in grid-stride turns.
    const int64_t blocks = std::min<int64_t>(pieces, int64_t(sm_count()) * 32);
    at::Tensor partial = at::empty({pieces}, table.options());
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, model_output.scalar_type(), "diffusion_loss_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const acc_t* tab = table.const_data_ptr<acc_t>();
      const int64_t* tp = t.const_data_ptr<int64_t>();
      loss_partials_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
          model_output.const_data_ptr<scalar_t>(), x_start.const_data_ptr<scalar_t>(),
          noise.const_data_ptr<scalar_t>(), tp, tab, table.size(1), N, chunks, pieces, param, l1,
          partial.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      loss_finish_kernel<scalar_t><<<1, kThreads, 0, stream>>>(
          partial.const_data_ptr<acc_t>(), chunks, tp, tab, table.size(1), B, N, param, l_simple_weight,
          original_elbo_weight, loss.mutable_data_ptr<scalar_t>(), loss_simple.mutable_data_ptr<scalar_t>(),
          loss_vlb.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void diffusion_loss_backward(const at::Tensor& grad_loss, const at::Tensor& grad_loss_simple,
                                      const at::Tensor& grad_loss_vlb, const at::Tensor& model_output,
                                      const at::Tensor& x_start, const at::Tensor& noise, const at::Tensor& t,
                                      const at::Tensor& table, Param param, bool l1, double l_simple_weight,
                                      double original_elbo_weight, const at::Tensor& grad) {
    // The kernel reads the incoming gradients on the device (no host sync).
    for (const at::Tensor* g : {&grad_loss, &grad_loss_simple, &grad_loss_vlb}) {
      TORCH_CHECK(g->numel() == 1 && g->scalar_type() == model_output.scalar_type() &&
                      g->device() == model_output.device(),
                  "ddpm_kernels: the loss gradients must be one-element tensors of model_output's dtype and device");
    }
    const int64_t B = model_output.size(0), numel = model_output.numel();
    c10::cuda::CUDAGuard guard(model_output.device());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, model_output.scalar_type(), "diffusion_loss_bwd_cuda",
                                    [&] {
      using acc_t = at::opmath_type<scalar_t>;
      LossBackwardFn<scalar_t> f{grad_loss.const_data_ptr<scalar_t>(), grad_loss_simple.const_data_ptr<scalar_t>(),
                                 grad_loss_vlb.const_data_ptr<scalar_t>(), model_output.const_data_ptr<scalar_t>(),
                                 x_start.const_data_ptr<scalar_t>(), noise.const_data_ptr<scalar_t>(),
                                 grad.mutable_data_ptr<scalar_t>(), t.const_data_ptr<int64_t>(),
                                 table.const_data_ptr<acc_t>(), table.size(1), B, numel / B, param, l1,
                                 acc_t(l_simple_weight), acc_t(original_elbo_weight)};
      launch_per_sample<scalar_t>(vector_width<scalar_t>(f.N, {f.out}), numel, f.N, f);
    });
  }
};

}  // namespace
}  // namespace cuda
}  // namespace ddpm

TORCH_LIBRARY_IMPL(ddpm_kernels, CUDA, m) { ddpm::register_kernels<ddpm::cuda::Kernels>(m); }
