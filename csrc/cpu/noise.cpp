#include "noise.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/DistributionsHelper.h>

#include <limits>
#include <mutex>

namespace ddpm::cpu::CPU_CAPABILITY {
namespace {

constexpr int64_t kGroups = kBlock / 4;  // one Philox call gives four normals

}  // namespace

void normal_block(const StreamState& st, int64_t b, int64_t e0, float* buf) {
  alignas(64) uint32_t r[4][kGroups];
  const uint32_t k0 = uint32_t(st.key), k1 = uint32_t(st.key >> 32);
  const uint32_t s = uint32_t(uint64_t(b + st.sample_offset));
  const uint32_t o0 = uint32_t(st.offset), o1 = uint32_t(st.offset >> 32);
  const uint64_t q0 = uint64_t(e0 / 4);
  // Independent lanes: the compiler vectorizes this loop at the build's vector width.
  for (int64_t j = 0; j < kGroups; ++j) {
    uint32_t c0 = uint32_t(q0 + uint64_t(j)), c1 = s, c2 = o0, c3 = o1;
    philox4x32_10(c0, c1, c2, c3, k0, k1);
    r[0][j] = c0;
    r[1][j] = c1;
    r[2][j] = c2;
    r[3][j] = c3;
  }
  alignas(64) float u[4][kGroups];
  for (int k = 0; k < 4; ++k)
    for (int64_t j = 0; j < kGroups; ++j) u[k][j] = philox_uniform(r[k][j]);
  using FVec = Vectorized<float>;
  alignas(64) float z[4][kGroups];
  const FVec minus_two(-2.0f), two_pi(kTwoPiF);
  for (int pair = 0; pair < 2; ++pair) {
    for (int64_t j = 0; j < kGroups; j += FVec::size()) {
      const FVec radius = (minus_two * FVec::loadu(&u[2 * pair][j]).log()).sqrt();
      const FVec theta = two_pi * FVec::loadu(&u[2 * pair + 1][j]);
      (radius * theta.cos()).store(&z[2 * pair][j]);
      (radius * theta.sin()).store(&z[2 * pair + 1][j]);
    }
  }
  // element 4j + k takes output k of group j
  for (int64_t j = 0; j < kGroups; ++j)
    for (int k = 0; k < 4; ++k) buf[4 * j + k] = z[k][j];
}

// The key of ddpm_kernels/_stream.py, randint(0, 2**63 - 1, (1,)), drawn as ATen's CPU random_from_to draws it
// for a range past 2**32 (one random64() reduced mod the range, under the generator's lock) without the
// one-element tensor, whose allocation and two dispatches cost more than the rest of a small step's host time.
uint64_t draw_seed(std::optional<at::Generator> generator) {
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(generator, at::detail::getDefaultCPUGenerator());
  std::lock_guard<std::mutex> lock(gen->mutex_);
  return gen->random64() % static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
}

}  // namespace ddpm::cpu::CPU_CAPABILITY
