#include "cpu_rows.h"

#include <algorithm>

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

}  // namespace fcnkern
