// The three implicit-GEMM problems of the CUDA conv + ReLU kernels (cpp/conv_relu_cuda.cu): how each gathers its
// operands from the tensors and where its results go. Host and device code, so that tests can run the same index
// arithmetic on the CPU (tests/test_conv_relu_cuda_problems.py) where no GPU is available; fp16/bf16 only under nvcc.
#pragma once

#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common.h"
#include "conv_relu.h"

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace fcnkern {
namespace conv_gemm {

FCNK_HD inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// Device element types and conversions (c10::Half / c10::BFloat16 share __half's / __nv_bfloat16's layout).
template <typename T>
struct Native {
  using type = T;
};
#ifdef __CUDACC__
template <>
struct Native<c10::Half> {
  using type = __half;
};
template <>
struct Native<c10::BFloat16> {
  using type = __nv_bfloat16;
};
#endif

#ifdef __CUDACC__
FCNK_HD inline float to_acc(__half v) { return __half2float(v); }
FCNK_HD inline float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
#endif
FCNK_HD inline float to_acc(float v) { return v; }
FCNK_HD inline double to_acc(double v) { return v; }
template <typename T>
FCNK_HD inline T from_acc(float v);
#ifdef __CUDACC__
template <>
FCNK_HD inline __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <>
FCNK_HD inline __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
#endif
template <>
FCNK_HD inline float from_acc<float>(float v) { return v; }
template <typename T>
FCNK_HD inline T from_acc(double v) {
  return static_cast<T>(v);
}

template <typename T>
using acc_of = std::conditional_t<std::is_same_v<T, double>, double, float>;

struct Shape {
  int64_t n, c, h, w, k, r, s, oh, ow, c_g, k_g, j, sh, sw, ph, pw, dh, dw;
};

inline Shape make_shape(const ConvGeometry& g) {
  return {g.n, g.c, g.h, g.w, g.k, g.r, g.s, g.oh, g.ow, g.c_g, g.k_g, g.j,
          g.stride_h, g.stride_w, g.pad_h, g.pad_w, g.dil_h, g.dil_w};
}

struct Strides {
  int64_t n, c, h, w;
};
inline Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

// The masked output gradient dy * (y > 0) (dy itself without the ReLU) at (n, k, oh, ow).
template <typename T>
FCNK_HD inline acc_of<T> masked_grad(const T* dy, Strides dys, const T* y, Strides ys, bool relu,
                                                 int64_t n, int64_t k, int64_t oh, int64_t ow) {
  const acc_of<T> g = to_acc(dy[n * dys.n + k * dys.c + oh * dys.h + ow * dys.w]);
  if (!relu) return g;
  return to_acc(y[n * ys.n + k * ys.c + oh * ys.h + ow * ys.w]) > acc_of<T>(0) ? g : acc_of<T>(0);
}

// x at (n, c, ih, iw) of the zero-padded input.
template <typename T>
FCNK_HD inline acc_of<T> padded_x(const T* x, Strides xs, const Shape& s, int64_t n, int64_t c,
                                              int64_t ih, int64_t iw) {
  return (ih >= 0 && ih < s.h && iw >= 0 && iw < s.w) ? to_acc(x[n * xs.n + c * xs.c + ih * xs.h + iw * xs.w])
                                                      : acc_of<T>(0);
}

// Forward: GEMM rows are output pixels (n, oh, ow), columns one group's output channels, reduction j = (c, r, s).
template <typename T>
struct Forward {
  using scalar_t = T;
  static constexpr bool kAFastM = true, kBFastN = false, kStoreFastM = true;
  Shape s;
  const T *x, *w, *bias;
  T* y;
  Strides xs, ys;
  bool relu;
  int64_t group = 0, k_begin = 0, k_end = 0;

  FCNK_HD void begin(int64_t z) { group = z, k_begin = 0, k_end = s.j; }
  FCNK_HD int64_t rows() const { return s.n * s.oh * s.ow; }
  FCNK_HD int64_t cols() const { return s.k_g; }
  FCNK_HD acc_of<T> a(int64_t m, int64_t j) const {
    const int64_t ow = m % s.ow, oh = (m / s.ow) % s.oh, n = m / (s.ow * s.oh);
    const int64_t sx = j % s.s, r = (j / s.s) % s.r, c = j / (s.s * s.r);
    return padded_x(x, xs, s, n, group * s.c_g + c, oh * s.sh - s.ph + r * s.dh, ow * s.sw - s.pw + sx * s.dw);
  }
  FCNK_HD acc_of<T> b(int64_t j, int64_t k) const { return to_acc(w[(group * s.k_g + k) * s.j + j]); }
  FCNK_HD void store(int64_t m, int64_t k, acc_of<T> v) const {
    const int64_t ow = m % s.ow, oh = (m / s.ow) % s.oh, n = m / (s.ow * s.oh), kk = group * s.k_g + k;
    if (bias != nullptr) v += to_acc(bias[kk]);
    if (relu) v = v < acc_of<T>(0) ? acc_of<T>(0) : v;  // NaN stays NaN, as in torch.relu
    y[n * ys.n + kk * ys.c + oh * ys.h + ow * ys.w] = from_acc<T>(v);
  }
};

// dgrad: rows are input pixels (n, ih, iw), columns one group's input channels, reduction (k, r, s).
template <typename T>
struct Dgrad {
  using scalar_t = T;
  static constexpr bool kAFastM = true, kBFastN = false, kStoreFastM = true;
  Shape s;
  const T *dy, *y, *w;
  T* dx;
  Strides dys, ys, dxs;
  bool relu;
  int64_t group = 0, k_begin = 0, k_end = 0;

  FCNK_HD void begin(int64_t z) { group = z, k_begin = 0, k_end = s.k_g * s.r * s.s; }
  FCNK_HD int64_t rows() const { return s.n * s.h * s.w; }
  FCNK_HD int64_t cols() const { return s.c_g; }
  FCNK_HD acc_of<T> a(int64_t m, int64_t t) const {
    const int64_t iw = m % s.w, ih = (m / s.w) % s.h, n = m / (s.w * s.h);
    const int64_t sx = t % s.s, r = (t / s.s) % s.r, k = t / (s.s * s.r);
    const int64_t oh_s = ih + s.ph - r * s.dh, ow_s = iw + s.pw - sx * s.dw;  // = oh * sh, ow * sw if tapped
    if (oh_s < 0 || ow_s < 0 || oh_s % s.sh != 0 || ow_s % s.sw != 0) return acc_of<T>(0);
    const int64_t oh = oh_s / s.sh, ow = ow_s / s.sw;
    if (oh >= s.oh || ow >= s.ow) return acc_of<T>(0);
    return masked_grad(dy, dys, y, ys, relu, n, group * s.k_g + k, oh, ow);
  }
  FCNK_HD acc_of<T> b(int64_t t, int64_t c) const {
    const int64_t rs = t % (s.r * s.s), k = t / (s.r * s.s);
    return to_acc(w[(group * s.k_g + k) * s.j + c * s.r * s.s + rs]);
  }
  FCNK_HD void store(int64_t m, int64_t c, acc_of<T> v) const {
    const int64_t iw = m % s.w, ih = (m / s.w) % s.h, n = m / (s.w * s.h);
    dx[n * dxs.n + (group * s.c_g + c) * dxs.c + ih * dxs.h + iw * dxs.w] = from_acc<T>(v);
  }
};

// wgrad: rows one group's output channels, columns j = (c, r, s), reduction over a split's range of output pixels.
template <typename T>
struct Wgrad {
  using scalar_t = T;
  static constexpr bool kAFastM = false, kBFastN = false, kStoreFastM = false;
  Shape s;
  const T *dy, *y, *x;
  acc_of<T>* ws;  // splits x K x J
  Strides dys, ys, xs;
  bool relu;
  int64_t groups, chunk;
  int64_t group = 0, split = 0, k_begin = 0, k_end = 0;

  FCNK_HD void begin(int64_t z) {
    group = z % groups, split = z / groups;
    k_begin = split * chunk;
    k_end = imin(k_begin + chunk, s.n * s.oh * s.ow);
  }
  FCNK_HD int64_t rows() const { return s.k_g; }
  FCNK_HD int64_t cols() const { return s.j; }
  FCNK_HD acc_of<T> a(int64_t k, int64_t p) const {
    const int64_t ow = p % s.ow, oh = (p / s.ow) % s.oh, n = p / (s.ow * s.oh);
    return masked_grad(dy, dys, y, ys, relu, n, group * s.k_g + k, oh, ow);
  }
  FCNK_HD acc_of<T> b(int64_t p, int64_t j) const {
    const int64_t ow = p % s.ow, oh = (p / s.ow) % s.oh, n = p / (s.ow * s.oh);
    const int64_t sx = j % s.s, r = (j / s.s) % s.r, c = j / (s.s * s.r);
    return padded_x(x, xs, s, n, group * s.c_g + c, oh * s.sh - s.ph + r * s.dh, ow * s.sw - s.pw + sx * s.dw);
  }
  FCNK_HD void store(int64_t k, int64_t j, acc_of<T> v) const {
    ws[(split * s.k + group * s.k_g + k) * s.j + j] = v;
  }
};

// wgrad's pixel reduction in `splits` chunks, each a multiple of the tile depth (the last may be shorter).
inline int64_t wgrad_chunk(int64_t pixels, int64_t splits, int64_t depth) {
  const int64_t per_split = (std::max<int64_t>(pixels, 1) + splits - 1) / splits;
  return (per_split + depth - 1) / depth * depth;
}

}  // namespace conv_gemm
}  // namespace fcnkern
