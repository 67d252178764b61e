// The noise stream (docs/design.md, "Noise streams"; ddpm_kernels.reference.philox_normal is the
// specification), shared by the CPU and CUDA kernels so both compile the same Philox and the same transform.
//
// Element e of global sample s is output e % 4 of Philox4x32-10 (Salmon et al., SC'11) at the counter
// (e / 4, s, offset_lo, offset_hi) under the 64-bit key (key_lo, key_hi); each 32-bit output x becomes the
// uniform ((x >> 8) + 0.5) * 2^-24 in (0, 1), and the pairs (u0, u1), (u2, u3) two normals each by Box-Muller,
// sqrt(-2 ln u_even) * (cos, sin)(2 pi u_odd), in float32.
#pragma once

#include <cstdint>

#include "family.h"

namespace ddpm {

// Philox4x32-10 of the counter (c0, c1, c2, c3), in place. The 64-bit products are what GCC vectorizes
// (vpmuludq) in the CPU's lane loops and nvcc turns into mul.hi / mul.lo.
DDPM_HD void philox4x32_10(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0, uint32_t k1) {
  DDPM_UNROLL
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

// (0, 1) exactly: 24 random bits, centred in their interval, so log(u) is finite; every step is exact.
DDPM_HD float philox_uniform(uint32_t x) { return (static_cast<float>(x >> 8) + 0.5f) * 5.9604644775390625e-08f; }

constexpr float kTwoPiF = 6.283185307179586f;

// Where one call's noise comes from: the key and offset taken from the generator, and the global index of the
// call's first sample.
struct StreamState {
  uint64_t key;
  uint64_t offset;
  int64_t sample_offset;
};

// The four raw outputs of 4-element group q of global sample s.
DDPM_HD void stream_words(const StreamState& st, uint64_t s, uint64_t q, uint32_t r[4]) {
  r[0] = uint32_t(q);
  r[1] = uint32_t(s);
  r[2] = uint32_t(st.offset);
  r[3] = uint32_t(st.offset >> 32);
  philox4x32_10(r[0], r[1], r[2], r[3], uint32_t(st.key), uint32_t(st.key >> 32));
}

#if defined(__CUDACC__)
// The four normals of group q of call-local sample b (elements 4q .. 4q + 3 of the sample). logf, sinf and
// cosf are CUDA's accurate versions (the build does not use fast math): within 2 ulps.
__device__ __forceinline__ void stream_normal4(const StreamState& st, int64_t b, int64_t q, float z[4]) {
  uint32_t r[4];
  stream_words(st, uint64_t(b + st.sample_offset), uint64_t(q), r);
  DDPM_UNROLL
  for (int p = 0; p < 2; ++p) {
    const float radius = sqrtf(-2.0f * logf(philox_uniform(r[2 * p])));
    const float theta = kTwoPiF * philox_uniform(r[2 * p + 1]);
    z[2 * p] = radius * cosf(theta);
    z[2 * p + 1] = radius * sinf(theta);
  }
}
#endif

}  // namespace ddpm
