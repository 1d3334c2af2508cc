// Row sources of the CPU convolution kernels that stage whole input rows (Winograd, register-blocked).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>

#include <array>
#include <cstdint>
#include <type_traits>

#include "cpu_rows.h"

namespace fcnkern {

// Whole rows of a 4-d tensor (any strides, any dtype) read into acc_t: x's rows (InputRows), and the rows of
// dy' = dy * (y > 0) (MaskedGradRows; dy itself where relu is false). The row sources of the Winograd and
// register-blocked kernels; called as source(n, c, r, dst).
template <typename scalar_t, typename acc_t>
struct InputRows {
  const scalar_t* data;
  std::array<int64_t, 4> strides;
  int64_t width;
  explicit InputRows(const at::Tensor& t)
      : data(t.const_data_ptr<scalar_t>()), strides{t.stride(0), t.stride(1), t.stride(2), t.stride(3)},
        width(t.size(3)) {}
  const scalar_t* row(int64_t n, int64_t c, int64_t r) const {
    return data + n * strides[0] + c * strides[1] + r * strides[2];
  }
  bool dense_float() const {
    return std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float> && strides[3] == 1;
  }
  void operator()(int64_t n, int64_t c, int64_t r, acc_t* dst) const {
    const scalar_t* src = row(n, c, r);
    if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
      if (strides[3] == 1) return copy_row_f(src, width, dst);
    }
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<acc_t, float>) {
      if (strides[3] == 1) return bf16_row_to_f(reinterpret_cast<const uint16_t*>(src), width, dst);
    }
    for (int64_t i = 0; i < width; ++i) dst[i] = static_cast<acc_t>(src[i * strides[3]]);
  }
};

template <typename scalar_t, typename acc_t>
struct MaskedGradRows {
  InputRows<scalar_t, acc_t> grad, y;
  bool relu;
  MaskedGradRows(const at::Tensor& grad_out, const at::Tensor& out, bool relu_mask)
      : grad(grad_out), y(out), relu(relu_mask) {}
  void operator()(int64_t n, int64_t k, int64_t r, acc_t* dst) const {
    if (!relu) return grad(n, k, r, dst);
    const scalar_t *gr = grad.row(n, k, r), *yr = y.row(n, k, r);
    if (grad.dense_float() && y.dense_float()) {
      return masked_row_f(reinterpret_cast<const float*>(gr), reinterpret_cast<const float*>(yr), grad.width,
                          reinterpret_cast<float*>(dst));
    }
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<acc_t, float>) {
      if (grad.strides[3] == 1 && y.strides[3] == 1) {
        return masked_row_bf16(reinterpret_cast<const uint16_t*>(gr), reinterpret_cast<const uint16_t*>(yr),
                               grad.width, dst);
      }
    }
    for (int64_t i = 0; i < grad.width; ++i) {
      const acc_t v = static_cast<acc_t>(gr[i * grad.strides[3]]);
      dst[i] = static_cast<acc_t>(yr[i * y.strides[3]]) <= acc_t(0) ? acc_t(0) : v;
    }
  }
};

}  // namespace fcnkern
