// Vectorisable float math for the CPU kernels.
//
// libm's expf is a function call GCC cannot vectorise without -ffast-math (which would also break the
// -inf/NaN handling the kernels rely on), so the softmax loops use this branch-free Cody-Waite + Cephes
// polynomial exp instead: ~1 ulp over the range that matters, and written so that `#pragma omp simd` loops
// over it compile to AVX2/AVX-512 code.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// One build serves every x86-64 CPU: GCC emits an AVX-512, an AVX2+FMA and a baseline copy of each hot
// function and picks one at load time.
#define FCNK_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FCNK_MULTIVERSION
#endif

namespace fcnkern {

// Whether v is inf or NaN, branch-free so that the loops over rows vectorise: inf - inf and NaN - NaN are NaN.
template <typename T>
inline __attribute__((always_inline)) bool non_finite(T v) {
  return !(v - v == T(0));
}

static inline __attribute__((always_inline)) float exp_approx(float x) {
  // Below -87.3 the true value is a float denormal or zero; flushing it to 0 keeps 2^n representable.
  const bool underflow = x < -87.33654f;
  x = x > 88.3762626647949f ? 88.3762626647949f : x;
  x = x < -87.33654f ? -87.33654f : x;
  // Round x*log2(e) to nearest with the 1.5*2^23 trick: vectorisable without SSE4.1's roundps.
  const float magic = 12582912.0f;
  float n = (x * 1.44269504088896341f + magic) - magic;
  // Cody-Waite: ln2 split in two so that x - n*ln2 is exact enough.
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return underflow ? 0.0f : p * scale;
}

static inline __attribute__((always_inline)) float log_approx(float x) {
  // Cephes logf for normal positive x (the kernels take it of sums >= 1): x = m * 2^e with m in [sqrt(1/2),
  // sqrt(2)), then a degree-8 polynomial in m - 1. Non-positive or non-finite x goes to the caller's NaN/inf path.
  int32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  int32_t e = ((bits >> 23) & 0xff) - 126;
  int32_t mbits = (bits & 0x007fffff) | 0x3f000000;  // mantissa scaled into [0.5, 1)
  float m;
  std::memcpy(&m, &mbits, sizeof(m));
  const bool small = m < 0.707106781186547524f;
  e = small ? e - 1 : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float p = 7.0376836292e-2f;
  p = p * m - 1.1514610310e-1f;
  p = p * m + 1.1676998740e-1f;
  p = p * m - 1.2420140846e-1f;
  p = p * m + 1.4249322787e-1f;
  p = p * m - 1.6668057665e-1f;
  p = p * m + 2.0000714765e-1f;
  p = p * m - 2.4999993993e-1f;
  p = p * m + 3.3333331174e-1f;
  const float fe = static_cast<float>(e);
  float r = p * m * z;
  r += fe * -2.12194440e-4f;
  r -= 0.5f * z;
  return m + r + fe * 0.693359375f;
}

}  // namespace fcnkern
