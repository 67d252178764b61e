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

void pair_dispatch(PairOp op, const at::Tensor& x, const at::Tensor& y, const at::Tensor& t, const at::Tensor& table,
                   const at::Tensor& out) {
  check_common(x, t, table);
  check_data("second operand", y, x);
  check_data("out", out, x);
  if (x.numel() == 0) return;
  c10::cuda::CUDAGuard guard(x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ddpm_kernels_pair_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    PairFn<scalar_t> f{op, x.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                       t.const_data_ptr<int64_t>(), table.const_data_ptr<acc_t>(), table.size(1)};
    const int64_t N = x.numel() / x.size(0);
    launch_per_sample<scalar_t>(vector_width<scalar_t>(N, {f.x, f.y, f.out}), x.numel(), N, f);
  });
}

template <PairOp kOp>
at::Tensor pair_op(const at::Tensor& x, const at::Tensor& t, const at::Tensor& y, const at::Tensor& table) {
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  pair_dispatch(kOp, x, y, t, table, out);
  return out;
}

at::Tensor q_sample_kernel(const at::Tensor& x_start, const at::Tensor& t, const at::Tensor& noise,
                           const at::Tensor& table) {
  return pair_op<PairOp::kQSample>(x_start, t, noise, table);
}

void q_sample_out_kernel(const at::Tensor& x_start, const at::Tensor& t, const at::Tensor& noise,
                         const at::Tensor& table, const at::Tensor& out) {
  pair_dispatch(PairOp::kQSample, x_start, noise, t, table, out);
}

at::Tensor get_v_kernel(const at::Tensor& x_start, const at::Tensor& noise, const at::Tensor& t,
                        const at::Tensor& table) {
  return pair_op<PairOp::kGetV>(x_start, t, noise, table);
}

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

std::tuple<at::Tensor, at::Tensor> q_sample_backward_kernel(const at::Tensor& grad, const at::Tensor& t,
                                                            const at::Tensor& table) {
  check_common(grad, t, table);
  at::Tensor gx = at::empty_like(grad, at::MemoryFormat::Contiguous);
  at::Tensor gn = at::empty_like(grad, at::MemoryFormat::Contiguous);
  if (grad.numel() == 0) return {gx, gn};
  c10::cuda::CUDAGuard guard(grad.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "q_sample_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    QSampleBackwardFn<scalar_t> f{grad.const_data_ptr<scalar_t>(), gx.mutable_data_ptr<scalar_t>(),
                                  gn.mutable_data_ptr<scalar_t>(), t.const_data_ptr<int64_t>(),
                                  table.const_data_ptr<acc_t>(), table.size(1)};
    const int64_t N = grad.numel() / grad.size(0);
    launch_per_sample<scalar_t>(vector_width<scalar_t>(N, {f.g, f.gx, f.gn}), grad.numel(), N, f);
  });
  return {gx, gn};
}

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
};

template <typename scalar_t>
__global__ void variances_kernel(at::opmath_type<scalar_t>* var, at::opmath_type<scalar_t>* log_var,
                                 const int64_t* t, const at::opmath_type<scalar_t>* table, int64_t T, int64_t B) {
  write_variances(var, log_var, t, table, T, B);
}

void run_step(const at::Tensor& x_t, const at::Tensor& t, const at::Tensor& mo, const at::Tensor& table,
              const at::Tensor* noise, Param param, bool clip, const at::Tensor& out, at::Tensor* var,
              at::Tensor* log_var) {
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> q_posterior_kernel(const at::Tensor& x_start, const at::Tensor& x_t,
                                                                  const at::Tensor& t, const at::Tensor& table) {
  check_common(x_t, t, table);
  check_data("x_start", x_start, x_t);
  at::Tensor mean = at::empty_like(x_t, at::MemoryFormat::Contiguous);
  at::Tensor var = at::empty(per_sample_shape(x_t), table.options());
  at::Tensor log_var = at::empty(per_sample_shape(x_t), table.options());
  run_step(x_t, t, x_start, table, nullptr, Param::kX0, false, mean, &var, &log_var);
  return {mean, var, log_var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> p_mean_variance_kernel(const at::Tensor& x_t, const at::Tensor& t,
                                                                      const at::Tensor& model_output,
                                                                      const at::Tensor& table,
                                                                      c10::string_view parameterization,
                                                                      bool clip_denoised) {
  check_common(x_t, t, table);
  check_data("model_output", model_output, x_t);
  const Param param = parse_param(std::string(parameterization));
  at::Tensor mean = at::empty_like(x_t, at::MemoryFormat::Contiguous);
  at::Tensor var = at::empty(per_sample_shape(x_t), table.options());
  at::Tensor log_var = at::empty(per_sample_shape(x_t), table.options());
  run_step(x_t, t, model_output, table, nullptr, param, clip_denoised, mean, &var, &log_var);
  return {mean, var, log_var};
}

// In-kernel noise: thread `tid` owns 4-element groups tid, tid + stride, ...; its Philox subsequence is tid
// and each group takes one curand_normal4 (one Philox call, four normals).
template <typename scalar_t>
__global__ void p_sample_random_kernel(StepFn<scalar_t> f, int64_t numel, int64_t N, at::PhiloxCudaState philox) {
  using acc_t = at::opmath_type<scalar_t>;
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
      if (i < numel) {
        const int64_t b = i / N;
        const Step<acc_t> c = step_coefficients<acc_t>(f.param, f.table, f.T, f.t[b]);
        const acc_t r = step_mean(c, f.param, f.clip, acc_t(f.x_t[i]), acc_t(f.mo[i])) + c.sigma * acc_t(z[k]);
        f.out[i] = static_cast<scalar_t>(r);
      }
    }
  }
}

void p_sample_out_kernel(const at::Tensor& x_t, const at::Tensor& t, const at::Tensor& model_output,
                         const at::Tensor& table, c10::string_view parameterization, bool clip_denoised,
                         const std::optional<at::Tensor>& noise, std::optional<at::Generator> generator,
                         const at::Tensor& out) {
  check_common(x_t, t, table);
  check_data("model_output", model_output, x_t);
  check_data("out", out, x_t);
  const Param param = parse_param(std::string(parameterization));
  if (noise.has_value()) {
    check_data("noise", *noise, x_t);
    run_step(x_t, t, model_output, table, &*noise, param, clip_denoised, out, nullptr, nullptr);
    return;
  }
  const int64_t numel = x_t.numel();
  if (numel == 0) return;
  c10::cuda::CUDAGuard guard(x_t.device());
  const int64_t groups = (numel + 3) / 4;
  const int64_t blocks = grid_for(groups);
  // Philox offset consumed per thread: 4 32-bit values per curand_normal4 call, one call per group it owns.
  const uint64_t calls_per_thread = uint64_t((groups + blocks * kThreads - 1) / (blocks * kThreads));
  auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(generator, at::cuda::detail::getDefaultCUDAGenerator());
  at::PhiloxCudaState philox;
  {
    std::lock_guard<std::mutex> lock(gen->mutex_);
    philox = gen->philox_cuda_state(calls_per_thread * 4);
  }
  const int64_t N = numel / x_t.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_t.scalar_type(), "p_sample_random_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    StepFn<scalar_t> f{x_t.const_data_ptr<scalar_t>(), model_output.const_data_ptr<scalar_t>(), nullptr,
                       out.mutable_data_ptr<scalar_t>(), t.const_data_ptr<int64_t>(), table.const_data_ptr<acc_t>(),
                       table.size(1), param, clip_denoised};
    p_sample_random_kernel<scalar_t><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(f, numel, N, philox);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor p_sample_kernel(const at::Tensor& x_t, const at::Tensor& t, const at::Tensor& model_output,
                           const at::Tensor& table, c10::string_view parameterization, bool clip_denoised,
                           const std::optional<at::Tensor>& noise, std::optional<at::Generator> generator) {
  at::Tensor out = at::empty_like(x_t, at::MemoryFormat::Contiguous);
  p_sample_out_kernel(x_t, t, model_output, table, parameterization, clip_denoised, noise, std::move(generator), out);
  return out;
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

// Grid (chunks, B): block (c, b) sums the per-element loss of chunk c of sample b into partial[b, c].
// Fixed-size chunks and tree sums: the result does not depend on scheduling.
template <typename scalar_t>
__global__ void loss_partials_kernel(const scalar_t* mo, const scalar_t* xs, const scalar_t* nz, const int64_t* t,
                                     const at::opmath_type<scalar_t>* table, int64_t T, int64_t N, Param param,
                                     bool l1, at::opmath_type<scalar_t>* partial) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t shared[kThreads / 32];
  const int64_t b = blockIdx.y, chunk = blockIdx.x;
  const LossCoef<acc_t> c = loss_coefficients<acc_t>(param, table, T, t[b]);
  const int64_t begin = b * N + chunk * kLossChunk;
  const int64_t end = begin + kLossChunk < (b + 1) * N ? begin + kLossChunk : (b + 1) * N;
  acc_t acc = 0;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const acc_t d = loss_diff(c, param, mo, xs, nz, i);
    acc += l1 ? (d < acc_t(0) ? -d : d) : d * d;
  }
  acc = block_sum(acc, shared);
  if (threadIdx.x == 0) partial[b * gridDim.x + chunk] = acc;
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> diffusion_loss_kernel(
    const at::Tensor& model_output, const at::Tensor& x_start, const at::Tensor& noise, const at::Tensor& t,
    const at::Tensor& table, c10::string_view parameterization, c10::string_view loss_type, double l_simple_weight,
    double original_elbo_weight) {
  check_common(model_output, t, table);
  check_data("x_start", x_start, model_output);
  check_data("noise", noise, model_output);
  const Param param = parse_param(std::string(parameterization));
  const bool l1 = parse_l1(std::string(loss_type));
  const int64_t B = model_output.size(0), numel = model_output.numel();
  TORCH_CHECK(B > 0 && numel > 0, "ddpm_kernels: diffusion_loss needs a non-empty batch");
  TORCH_CHECK(B <= 65535, "ddpm_kernels: diffusion_loss on CUDA supports batches up to 65535");
  const int64_t N = numel / B;
  const int64_t chunks = (N + kLossChunk - 1) / kLossChunk;
  c10::cuda::CUDAGuard guard(model_output.device());
  const auto opts = model_output.options();
  at::Tensor loss = at::empty({}, opts), loss_simple = at::empty({}, opts), loss_vlb = at::empty({}, opts);
  at::Tensor partial = at::empty({B * chunks}, table.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, model_output.scalar_type(), "diffusion_loss_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* tab = table.const_data_ptr<acc_t>();
    const int64_t* tp = t.const_data_ptr<int64_t>();
    loss_partials_kernel<scalar_t><<<dim3(unsigned(chunks), unsigned(B)), kThreads, 0, stream>>>(
        model_output.const_data_ptr<scalar_t>(), x_start.const_data_ptr<scalar_t>(), noise.const_data_ptr<scalar_t>(),
        tp, tab, table.size(1), N, param, l1, partial.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    loss_finish_kernel<scalar_t><<<1, kThreads, 0, stream>>>(partial.const_data_ptr<acc_t>(), chunks, tp, tab,
                                                             table.size(1), B, N, param, l_simple_weight,
                                                             original_elbo_weight, loss.mutable_data_ptr<scalar_t>(),
                                                             loss_simple.mutable_data_ptr<scalar_t>(),
                                                             loss_vlb.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, loss_simple, loss_vlb};
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

at::Tensor diffusion_loss_backward_kernel(const at::Tensor& grad_loss, const at::Tensor& grad_loss_simple,
                                          const at::Tensor& grad_loss_vlb, const at::Tensor& model_output,
                                          const at::Tensor& x_start, const at::Tensor& noise, const at::Tensor& t,
                                          const at::Tensor& table, c10::string_view parameterization,
                                          c10::string_view loss_type, double l_simple_weight,
                                          double original_elbo_weight) {
  check_common(model_output, t, table);
  check_data("x_start", x_start, model_output);
  check_data("noise", noise, model_output);
  const Param param = parse_param(std::string(parameterization));
  const bool l1 = parse_l1(std::string(loss_type));
  at::Tensor grad = at::empty_like(model_output, at::MemoryFormat::Contiguous);
  const int64_t B = model_output.size(0), numel = model_output.numel();
  if (numel == 0) return grad;
  c10::cuda::CUDAGuard guard(model_output.device());
  for (const at::Tensor* g : {&grad_loss, &grad_loss_simple, &grad_loss_vlb}) {
    TORCH_CHECK(g->numel() == 1 && g->scalar_type() == model_output.scalar_type() && g->device() == model_output.device(),
                "ddpm_kernels: the loss gradients must be one-element tensors of model_output's dtype and device");
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, model_output.scalar_type(), "diffusion_loss_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    LossBackwardFn<scalar_t> f{grad_loss.const_data_ptr<scalar_t>(), grad_loss_simple.const_data_ptr<scalar_t>(),
                               grad_loss_vlb.const_data_ptr<scalar_t>(), model_output.const_data_ptr<scalar_t>(),
                               x_start.const_data_ptr<scalar_t>(), noise.const_data_ptr<scalar_t>(),
                               grad.mutable_data_ptr<scalar_t>(), t.const_data_ptr<int64_t>(),
                               table.const_data_ptr<acc_t>(), table.size(1), B, numel / B, param, l1,
                               acc_t(l_simple_weight), acc_t(original_elbo_weight)};
    launch_per_sample<scalar_t>(vector_width<scalar_t>(f.N, {f.out}), numel, f.N, f);
  });
  return grad;
}

// ------------------------------------------------------------------------------------------- sampler steps
// ddim_step / ddpm_step. Two launches on the current stream: a (B,)-thread kernel derives each sample's
// coefficients in float64 from alphas_cumprod[t], [t_prev] of the float64 table (csrc/sampler_coefficients.h)
// and rounds them once into a (B, kSamplerSlots) buffer of the compute dtype; the elementwise kernel reads
// them per packet (L1/L2 resident). Float64 math never runs per element, which matters on GPUs with slow
// float64, and nothing is read on the host, so the step stays CUDA-graph safe.
enum class SamplerOp : int { kDdim = 0, kDdpm = 1 };

struct SamplerFlags {
  SamplerOp op;
  Param param;
  Variance variance;
  bool learned, clip, use_clipped, add_noise;
};

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
__device__ __forceinline__ acc_t sampler_element(const acc_t* c, const SamplerFlags& fl, acc_t clip_range, acc_t x,
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
  SamplerFlags fl;

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

// In-kernel noise exactly as p_sample_random_kernel: thread tid owns 4-element groups tid, tid + stride, ...,
// Philox subsequence tid, one curand_normal4 per group.
template <typename scalar_t>
__global__ void sampler_random_kernel(SamplerFn<scalar_t> f, int64_t numel, at::PhiloxCudaState philox) {
  using acc_t = at::opmath_type<scalar_t>;
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
      if (i < numel) f.element(i, i / f.N, acc_t(z[k]));
    }
  }
}

// Both steps: checks, coefficients, noise source, launch. Returns x0 (zero elements unless return_pred_x0).
at::Tensor sampler_step(SamplerOp op, const at::Tensor& x_t, const at::Tensor& t, const at::Tensor& t_prev,
                        const at::Tensor& model_output, const at::Tensor& table64, double eta,
                        c10::string_view parameterization, Variance variance, bool clip_denoised, double clip_range,
                        bool set_alpha_to_one, bool use_clipped, const std::optional<at::Tensor>& noise,
                        std::optional<at::Generator> generator, bool return_pred_x0, const at::Tensor& out) {
  const bool learned = op == SamplerOp::kDdpm && is_learned(variance);
  check_sampler(x_t, t, t_prev, model_output, table64, learned);
  check_data("out", out, x_t);
  const Param param = parse_param(std::string(parameterization));
  at::Tensor x0 = return_pred_x0 ? at::empty_like(x_t, at::MemoryFormat::Contiguous) : at::empty({0}, x_t.options());
  // ddim_step with eta == 0 has no noise term: nothing is read or drawn (as the reference)
  const bool add_noise = op == SamplerOp::kDdpm || eta > 0;
  const bool given = add_noise && noise.has_value();
  if (given) check_data("noise", *noise, x_t);
  const int64_t numel = x_t.numel();
  if (numel == 0) return x0;
  c10::cuda::CUDAGuard guard(x_t.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t B = x_t.size(0), N = numel / B;
  const SamplerFlags fl{op, param, variance, learned, clip_denoised, use_clipped, add_noise};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_t.scalar_type(), "ddpm_kernels_sampler_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor coef = at::empty({B, int64_t(kSamplerSlots)}, x_t.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    sampler_coefficients_kernel<acc_t><<<(B + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
        op, t.const_data_ptr<int64_t>(), t_prev.const_data_ptr<int64_t>(), table64.const_data_ptr<double>(),
        table64.size(1), B, eta, set_alpha_to_one, variance, coef.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    SamplerFn<scalar_t> f{x_t.const_data_ptr<scalar_t>(),
                          model_output.const_data_ptr<scalar_t>(),
                          given ? noise->const_data_ptr<scalar_t>() : nullptr,
                          out.mutable_data_ptr<scalar_t>(),
                          return_pred_x0 ? x0.mutable_data_ptr<scalar_t>() : nullptr,
                          coef.const_data_ptr<acc_t>(),
                          N,
                          learned ? N : 0,
                          static_cast<acc_t>(clip_range),
                          fl};
    if (add_noise && !given) {
      // p_sample's launch shape and Philox bookkeeping, so the generator advances the same way.
      const int64_t groups = (numel + 3) / 4;
      const int64_t blocks = grid_for(groups);
      const uint64_t calls_per_thread = uint64_t((groups + blocks * kThreads - 1) / (blocks * kThreads));
      auto* gen =
          at::get_generator_or_default<at::CUDAGeneratorImpl>(generator, at::cuda::detail::getDefaultCUDAGenerator());
      at::PhiloxCudaState philox;
      {
        std::lock_guard<std::mutex> lock(gen->mutex_);
        philox = gen->philox_cuda_state(calls_per_thread * 4);
      }
      sampler_random_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(f, numel, philox);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      launch_per_sample<scalar_t>(vector_width<scalar_t>(N, {f.x_t, f.mo, f.noise, f.out, f.x0}), numel, N, f);
    }
  });
  return x0;
}

at::Tensor ddim_step_out_kernel(const at::Tensor& x_t, const at::Tensor& t, const at::Tensor& t_prev,
                                const at::Tensor& model_output, const at::Tensor& table64, double eta,
                                c10::string_view parameterization, bool clip_denoised, double clip_range,
                                bool set_alpha_to_one, bool use_clipped_model_output,
                                const std::optional<at::Tensor>& noise, std::optional<at::Generator> generator,
                                bool return_pred_x0, const at::Tensor& out) {
  return sampler_step(SamplerOp::kDdim, x_t, t, t_prev, model_output, table64, eta, parameterization,
                      Variance::kFixedSmall, clip_denoised, clip_range, set_alpha_to_one, use_clipped_model_output,
                      noise, std::move(generator), return_pred_x0, out);
}

std::tuple<at::Tensor, at::Tensor> ddim_step_kernel(const at::Tensor& x_t, const at::Tensor& t,
                                                    const at::Tensor& t_prev, const at::Tensor& model_output,
                                                    const at::Tensor& table64, double eta,
                                                    c10::string_view parameterization, bool clip_denoised,
                                                    double clip_range, bool set_alpha_to_one,
                                                    bool use_clipped_model_output,
                                                    const std::optional<at::Tensor>& noise,
                                                    std::optional<at::Generator> generator, bool return_pred_x0) {
  at::Tensor out = at::empty_like(x_t, at::MemoryFormat::Contiguous);
  at::Tensor x0 = ddim_step_out_kernel(x_t, t, t_prev, model_output, table64, eta, parameterization, clip_denoised,
                                       clip_range, set_alpha_to_one, use_clipped_model_output, noise,
                                       std::move(generator), return_pred_x0, out);
  return {out, x0};
}

at::Tensor ddpm_step_out_kernel(const at::Tensor& x_t, const at::Tensor& t, const at::Tensor& t_prev,
                                const at::Tensor& model_output, const at::Tensor& table64,
                                c10::string_view parameterization, c10::string_view variance_type,
                                bool clip_denoised, double clip_range, const std::optional<at::Tensor>& noise,
                                std::optional<at::Generator> generator, bool return_pred_x0, const at::Tensor& out) {
  return sampler_step(SamplerOp::kDdpm, x_t, t, t_prev, model_output, table64, 0.0, parameterization,
                      parse_variance(std::string(variance_type)), clip_denoised, clip_range, true, false, noise,
                      std::move(generator), return_pred_x0, out);
}

std::tuple<at::Tensor, at::Tensor> ddpm_step_kernel(const at::Tensor& x_t, const at::Tensor& t,
                                                    const at::Tensor& t_prev, const at::Tensor& model_output,
                                                    const at::Tensor& table64, c10::string_view parameterization,
                                                    c10::string_view variance_type, bool clip_denoised,
                                                    double clip_range, const std::optional<at::Tensor>& noise,
                                                    std::optional<at::Generator> generator, bool return_pred_x0) {
  at::Tensor out = at::empty_like(x_t, at::MemoryFormat::Contiguous);
  at::Tensor x0 = ddpm_step_out_kernel(x_t, t, t_prev, model_output, table64, parameterization, variance_type,
                                       clip_denoised, clip_range, noise, std::move(generator), return_pred_x0, out);
  return {out, x0};
}

}  // namespace
}  // namespace cuda
}  // namespace ddpm

TORCH_LIBRARY_IMPL(ddpm_kernels, CUDA, m) {
  using namespace ddpm;
  using namespace ddpm::cuda;
  m.impl("q_sample", &q_sample_kernel);
  m.impl("q_sample_out", &q_sample_out_kernel);
  m.impl("q_sample_backward", &q_sample_backward_kernel);
  m.impl("predict_start_from_noise", &pair_op<PairOp::kPredictStartFromNoise>);
  m.impl("predict_noise_from_start", &pair_op<PairOp::kPredictNoiseFromStart>);
  m.impl("get_v", &get_v_kernel);
  m.impl("predict_start_from_z_and_v", &pair_op<PairOp::kPredictStartFromZAndV>);
  m.impl("predict_eps_from_z_and_v", &pair_op<PairOp::kPredictEpsFromZAndV>);
  m.impl("q_posterior", &q_posterior_kernel);
  m.impl("p_mean_variance", &p_mean_variance_kernel);
  m.impl("p_sample", &p_sample_kernel);
  m.impl("p_sample_out", &p_sample_out_kernel);
  m.impl("diffusion_loss", &diffusion_loss_kernel);
  m.impl("diffusion_loss_backward", &diffusion_loss_backward_kernel);
  m.impl("ddim_step", &ddim_step_kernel);
  m.impl("ddim_step_out", &ddim_step_out_kernel);
  m.impl("ddpm_step", &ddpm_step_kernel);
  m.impl("ddpm_step_out", &ddpm_step_out_kernel);
}
