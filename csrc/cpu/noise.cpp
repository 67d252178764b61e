#include "noise.h"

#include <ATen/CPUGeneratorImpl.h>

#include <mutex>

namespace ddpm::cpu::CPU_CAPABILITY {
namespace {

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

}  // namespace

void normal_block(int64_t blk, uint64_t seed, float* buf) {
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

uint64_t draw_seed(std::optional<at::Generator> generator) {
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(generator, at::detail::getDefaultCPUGenerator());
  std::lock_guard<std::mutex> lock(gen->mutex_);
  return gen->random64();
}

}  // namespace ddpm::cpu::CPU_CAPABILITY
