#include "noise.h"

#include <ATen/ops/randint.h>

#include <limits>

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

uint64_t draw_seed(std::optional<at::Generator> generator) {
  const at::Tensor key = at::randint(0, std::numeric_limits<int64_t>::max(), {1}, std::move(generator),
                                     at::TensorOptions().dtype(at::kLong));
  return static_cast<uint64_t>(*key.const_data_ptr<int64_t>());
}

}  // namespace ddpm::cpu::CPU_CAPABILITY
