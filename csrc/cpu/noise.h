// In-kernel noise of the CPU kernels: Philox4x32-10 keyed by one 64-bit draw from the generator per call,
// counter = global 4-element group, Box-Muller on each pair of 24-bit uniforms. Noise for element i depends
// only on i and the key, so results do not depend on the thread count, and p_sample and the sampler steps
// see the same normals from the same generator state.
#pragma once

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <cstring>
#include <optional>

#include "loops.h"

namespace ddpm::cpu::CPU_CAPABILITY {

// The key of one call's in-kernel noise: one 64-bit draw, so the same generator state gives the same noise
// and the generator advances like any other CPU sampling call.
uint64_t draw_seed(std::optional<at::Generator> generator);

// Standard normals of block `blk` into buf[0, kBlock). Element blk*kBlock + k*kCounters + j takes output k
// of counter blk*kCounters + j, so every lane store is contiguous.
void normal_block(int64_t blk, uint64_t seed, float* buf);

// normal_block's element i % kBlock of block i / kBlock, for the lanes of L. One per parallel task, keeping
// the last block it generated.
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
  static constexpr bool present() { return true; }
  template <typename IO>
  C10_ALWAYS_INLINE void get(int64_t i, int64_t, typename L::V* zv) {
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

// The z of a step on the CPU: none, the given tensor, or in-kernel (BlockNoise). Chosen per call;
// visit(f) calls f with the source as its own type, so each loop is compiled for one source (a runtime
// choice inside the loop kept the baseline build's loops from vectorizing).
template <typename scalar_t>
struct CpuNoise {
  enum class Mode { kNone, kGiven, kRandom };
  struct Spec {
    Mode mode;
    const scalar_t* given;
    uint64_t seed;
  };
  // Given noise, else in-kernel noise (drawing the key from the generator) when `draw`, else none.
  static Spec spec(const at::Tensor* noise, bool draw, std::optional<at::Generator> generator) {
    if (noise != nullptr) return {Mode::kGiven, noise->const_data_ptr<scalar_t>(), 0};
    if (draw) return {Mode::kRandom, nullptr, draw_seed(std::move(generator))};
    return {Mode::kNone, nullptr, 0};
  }

  Spec s;
  explicit CpuNoise(const Spec& spec) : s(spec) {}

  template <typename F>
  void visit(const F& f) const {
    if (s.mode == Mode::kGiven) {
      GivenNoise<scalar_t> given{s.given};
      f(given);
    } else if (s.mode == Mode::kRandom) {
      BlockNoise<Lanes<scalar_t>> block;
      block.seed = s.seed;
      f(block);
    } else {
      NoNoise none;
      f(none);
    }
  }
};

}  // namespace ddpm::cpu::CPU_CAPABILITY
