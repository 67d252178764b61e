// In-kernel noise of the CPU kernels: the noise stream of csrc/philox.h (the specification is
// ddpm_kernels.reference.philox_normal), keyed by one 64-bit draw from the CPU generator per call (offset 0).
// Noise for element e of sample b depends only on (key, b + sample_offset, e), so results do not depend on the
// thread count, on where the data's blocks fall, or on the other samples of the batch; p_sample, the sampler
// steps and the stochastic flow step see the same normals from the same generator state.
#pragma once

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <algorithm>
#include <cstring>
#include <initializer_list>
#include <optional>
#include <type_traits>

#include "../philox.h"
#include "loops.h"

namespace ddpm::cpu::CPU_CAPABILITY {

// The key of one call's in-kernel noise: the value randint(0, 2^63 - 1) of one int64 element gives (one 64-bit
// draw), as the reference draws it (ddpm_kernels._stream.draw_cpu_key), taken straight from the generator as
// ATen's random_from_to does: every CPU backend consumes the generator identically and draws the same key.
uint64_t draw_seed(std::optional<at::Generator> generator);

// Standard normals of elements [e0, e0 + kBlock) of call-local sample b (e0 % kBlock == 0) into buf, in
// element order: the groups e0 / 4 + j are generated as planes (one lane per group, so the Philox rounds and
// Box-Muller run at the build's vector width), then interleaved.
void normal_block(const StreamState& st, int64_t b, int64_t e0, float* buf);

// The normals of element i (flat index; N per sample) for the lanes of L. One per parallel task, keeping the
// last block it generated. Slices never span two samples (the loops run over sample-homogeneous segments).
template <typename L>
struct BlockNoise {
  using acc_t = typename L::acc_t;
  alignas(64) float f[kBlock];
  alignas(64) acc_t buf[kBlock + 64];
  StreamState st{};
  int64_t N = 1;
  int64_t b = -1, s_begin = 0, s_end = 0;  // the current sample and its flat range
  int64_t blk = -1;                         // the block of sample b held in buf

  void fill(int64_t k) {
    normal_block(st, b, k * kBlock, f);
    for (int64_t j = 0; j < kBlock; ++j) buf[j] = static_cast<acc_t>(f[j]);
    blk = k;
  }
  static constexpr bool present() { return true; }
  template <typename IO>
  C10_ALWAYS_INLINE void get(int64_t i, int64_t, typename L::V* zv) {
    if (i < s_begin || i >= s_end) {
      b = i / N;
      s_begin = b * N;
      s_end = s_begin + N;
      blk = -1;
    }
    const int64_t e = i - s_begin;
    const int64_t k = e / kBlock;
    if (k != blk) fill(k);
    const int64_t off = e - k * kBlock;
    if (off + L::size() <= kBlock) {
      L::load_acc(buf + off, zv);
      return;
    }
    // The vector straddles two blocks of the sample (a segment that does not start at a block boundary).
    alignas(64) acc_t tmp[64 + 64];
    const int64_t first = kBlock - off;
    std::memcpy(tmp, buf + off, sizeof(acc_t) * first);
    fill(k + 1);
    std::memcpy(tmp + first, buf, sizeof(acc_t) * (L::size() - first));
    L::load_acc(tmp, zv);
  }
};

// The z of a step on the CPU: none, the given tensor, or in-kernel (BlockNoise). Chosen per call;
// visit(f) calls f with the source as its own type, so each loop is compiled for one source (a runtime
// choice inside the loop kept the baseline build's loops from vectorizing).
// L / Ptrs: the IO and pointer policies of the call (a mixed call's: MixedLanes, MixedPtrs; csrc/cpu/loops.h).
template <typename scalar_t, typename L = Lanes<scalar_t>, typename Ptrs = SamePtrs<scalar_t>>
struct CpuNoise {
  enum class Mode { kNone, kGiven, kRandom };
  struct Spec {
    Mode mode;
    typename Ptrs::in given;
    StreamState st;
    int64_t N;
  };
  // Given noise, else in-kernel noise (drawing the key from the generator) when `draw`, else none. `x` is the
  // call's data (N elements per sample); `sample_offset` the global index of its first sample.
  static Spec spec(const at::Tensor* noise, bool draw, std::optional<at::Generator> generator, const at::Tensor& x,
                   int64_t sample_offset) {
    const int64_t B = x.dim() > 0 ? x.size(0) : 1;
    const int64_t N = B > 0 ? std::max<int64_t>(1, x.numel() / B) : 1;
    if (noise != nullptr) return {Mode::kGiven, Ptrs::input(*noise), {}, N};
    if (draw) return {Mode::kRandom, {}, {draw_seed(std::move(generator)), 0, sample_offset}, N};
    return {Mode::kNone, {}, {}, N};
  }

  Spec s;
  explicit CpuNoise(const Spec& spec) : s(spec) {}

  template <typename F>
  void visit(const F& f) const {
    if (s.mode == Mode::kGiven) {
      GivenNoise<scalar_t, typename Ptrs::in> given{s.given};
      f(given);
    } else if (s.mode == Mode::kRandom) {
      BlockNoise<L> block;
      block.st = s.st;
      block.N = s.N;
      f(block);
    } else {
      NoNoise none;
      f(none);
    }
  }
};

// The dispatch of a step with a noise term: f(Tag<scalar_t>, Tag<Ptrs>, Tag<IO>, z) for its dtypes
// (dispatch_model_operands: the mixed policies when its operands differ in dtype from `x`, the call's data; the
// typed autocast policy when its `model` outputs are its only 16-bit operands) with z its noise source, the
// given `noise`, else in-kernel noise when `draw` (the key drawn from `generator` for every such call, even an
// empty one, so that every drawing op advances the generator alike), else none. kWide: float32 data runs in
// MixedLanes' two-vector slices (for a functor with much per-slice work, such as the solver step's branches on
// its live terms, paid once per two vectors; the same operations per element, so the same bits).
template <bool kWide = false, typename F>
void dispatch_step_with_noise(std::initializer_list<const at::Tensor*> model,
                              std::initializer_list<const at::Tensor*> data, const at::Tensor& x,
                              const at::Tensor* noise, bool draw, const std::optional<at::Generator>& generator,
                              int64_t sample_offset, const F& f) {
  bool mixed = false;
  for (const auto* list : {&model, &data}) {
    for (const at::Tensor* t : *list) mixed = mixed || (t != nullptr && t->scalar_type() != x.scalar_type());
  }
  dispatch_model_operands(x.scalar_type(), mixed, model, data, [&](auto St, auto Ps, auto IO) {
    using scalar_t = typename decltype(St)::type;
    using L = std::conditional_t<kWide && std::is_same_v<scalar_t, float>, MixedLanes, typename decltype(IO)::type>;
    using Noise = CpuNoise<scalar_t, L, typename decltype(Ps)::type>;
    const Noise z(Noise::spec(noise, draw, generator, x, sample_offset));
    f(St, Ps, Tag<L>(), z);
  });
}

// dispatch_step_with_noise for a call whose functor reads no operand as a model output (`operands`, x among them).
template <bool kWide = false, typename F>
void dispatch_with_noise(std::initializer_list<const at::Tensor*> operands, const at::Tensor& x,
                         const at::Tensor* noise, bool draw, const std::optional<at::Generator>& generator,
                         int64_t sample_offset, const F& f) {
  dispatch_step_with_noise<kWide>({}, operands, x, noise, draw, generator, sample_offset, f);
}

}  // namespace ddpm::cpu::CPU_CAPABILITY
