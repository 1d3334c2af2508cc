#include "cpu_rows.h"

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cpu_math.h"

namespace fcnkern {

FCNK_MULTIVERSION void copy_row_f(const float* src, int64_t width, float* dst) { std::copy(src, src + width, dst); }

FCNK_MULTIVERSION void masked_row_f(const float* grad, const float* y, int64_t width, float* dst) {
  for (int64_t i = 0; i < width; ++i) dst[i] = y[i] <= 0.f ? 0.f : grad[i];
}

FCNK_MULTIVERSION void add_row_f(const float* src, int64_t width, float* dst) {
  for (int64_t i = 0; i < width; ++i) dst[i] += src[i];
}

FCNK_MULTIVERSION void bias_relu_row_f(const float* src, float add, bool relu, int64_t width, float* dst) {
  if (relu) {
    for (int64_t i = 0; i < width; ++i) dst[i] = std::max(src[i] + add, 0.f);
  } else {
    for (int64_t i = 0; i < width; ++i) dst[i] = src[i] + add;
  }
}

namespace {

inline __attribute__((always_inline)) float bf16_to_f(uint16_t v) {
  const uint32_t bits = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// c10::BFloat16's round-to-nearest-even, written without a branch so that the row loops vectorise.
inline __attribute__((always_inline)) uint16_t f_to_bf16(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  const uint16_t rounded = static_cast<uint16_t>((bits + ((bits >> 16) & 1) + 0x7fff) >> 16);
  return v != v ? uint16_t(0x7fc0) : rounded;
}

}  // namespace

FCNK_MULTIVERSION void f_row_to_bf16_bits(const float* src, int64_t width, uint16_t* dst) {
  for (int64_t i = 0; i < width; ++i) dst[i] = static_cast<uint16_t>(bf16_bits(src[i]));
}

FCNK_MULTIVERSION void bf16_pair_row(const float* lo, const float* hi, int64_t width, uint32_t* dst) {
  for (int64_t i = 0; i < width; ++i) dst[i] = bf16_bits(lo[i]) | bf16_bits(hi[i]) << 16;
}

FCNK_MULTIVERSION void bf16_row_to_f(const uint16_t* src, int64_t width, float* dst) {
  for (int64_t i = 0; i < width; ++i) dst[i] = bf16_to_f(src[i]);
}

FCNK_MULTIVERSION void masked_row_bf16(const uint16_t* grad, const uint16_t* y, int64_t width, float* dst) {
  for (int64_t i = 0; i < width; ++i) dst[i] = bf16_to_f(y[i]) <= 0.f ? 0.f : bf16_to_f(grad[i]);
}

FCNK_MULTIVERSION void bias_relu_row_bf16(const float* src, float add, bool relu, int64_t width, uint16_t* dst) {
  if (relu) {
    for (int64_t i = 0; i < width; ++i) dst[i] = f_to_bf16(std::max(src[i] + add, 0.f));
  } else {
    for (int64_t i = 0; i < width; ++i) dst[i] = f_to_bf16(src[i] + add);
  }
}

FCNK_MULTIVERSION bool any_non_finite_bf16(const uint16_t* v, int64_t n) {
  // An OR of 0/1 values, which GCC vectorises, where an early exit or a bool |= compiled to a scalar loop (a third of
  // the bf16 dW's own time outside its micro-kernel).
  uint32_t bad = 0;
  for (int64_t i = 0; i < n; ++i) bad |= static_cast<uint32_t>((v[i] & 0x7f80u) == 0x7f80u);
  return bad != 0;
}

}  // namespace fcnkern
