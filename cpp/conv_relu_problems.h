// The three implicit-GEMM problems of the CUDA conv + ReLU kernels (cpp/conv_relu_cuda.cu): how each gathers its
// operands from the tensors and where its results go. Host and device code, so that tests can run the same index
// arithmetic on the CPU (tests/test_conv_relu_cuda_problems.py) where no GPU is available; fp16/bf16 only under nvcc.
#pragma once

#include <ATen/core/Tensor.h>

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

// Whether every spatial coordinate the contexts below hold (input, output and tap positions, padding included) fits
// their 32-bit fields.
inline bool coordinates_fit_int32(const Shape& s) {
  const auto bound = [](int64_t in, int64_t out, int64_t stride, int64_t pad, int64_t taps, int64_t dil) {
    return in + out * stride + pad + (taps - 1) * dil < (int64_t(1) << 31) - 1;
  };
  return bound(s.h, s.oh, s.sh, s.ph, s.r, s.dh) && bound(s.w, s.ow, s.sw, s.pw, s.s, s.dw);
}

// Each operand element of the GEMMs below is a (row, column) pair of one operand whose index arithmetic splits
// into a part that depends only on the row and a part that depends only on the column: a "context" each, computed
// once per row of a block and once per column of a reduction slice, then combined by a few adds and compares per
// element. Decoding both indices for every element (six 64-bit divisions) was what bounded the first version of
// these kernels (a model of its integer work gives ~6 TFLOPS for conv3_2 on an H200; measured 6.6).
//
// Per problem: a_m(m) / a_k(k) the contexts of operand A's rows (GEMM rows m) and columns (reduction index k),
// b_k(k) / b_n(n) those of operand B, a(...) / b(...) the elements (0 where the kernel says the element lies outside
// the GEMM), store(row context, m, n, value) the result.

// Where output pixel (n, oh, ow)'s taps start in x: ih0 = oh * sh - ph, iw0 = ow * sw - pw, and the offset of
// (n, ih0, iw0) (which may lie outside x: it is only dereferenced with a tap that lands inside). Coordinates are
// 32-bit (the CUDA launcher checks that they fit), offsets 64-bit: 16 bytes, one shared-memory load.
struct PixelTaps {
  int64_t offset;
  int32_t ih0, iw0;
};
// Reduction index j = (c, r, s) of the x gather: the tap's offset in x (channel c of the group) and its reach.
struct XTap {
  int64_t offset;
  int32_t dh, dw;
};

// Output pixel p of the row-major N x OH x OW grid, decoded.
struct OutPixel {
  int64_t n, oh, ow;
};
FCNK_HD inline OutPixel out_pixel(const Shape& s, int64_t p) {
  return {p / (s.ow * s.oh), (p / s.ow) % s.oh, p % s.ow};
}

FCNK_HD inline PixelTaps pixel_taps(const Shape& s, Strides xs, const OutPixel& q) {
  const int64_t ih0 = q.oh * s.sh - s.ph, iw0 = q.ow * s.sw - s.pw;
  return {q.n * xs.n + ih0 * xs.h + iw0 * xs.w, static_cast<int32_t>(ih0), static_cast<int32_t>(iw0)};
}
FCNK_HD inline XTap x_tap(const Shape& s, Strides xs, int64_t group, int64_t j) {
  const int64_t sx = j % s.s, r = (j / s.s) % s.r, c = j / (s.s * s.r);
  const int64_t dh = r * s.dh, dw = sx * s.dw;
  return {(group * s.c_g + c) * xs.c + dh * xs.h + dw * xs.w, static_cast<int32_t>(dh), static_cast<int32_t>(dw)};
}
// x at tap t of pixel p, 0 in the padding or where the caller says the element lies outside the GEMM (`in_range`
// false: then p and t may be garbage). The load itself is unconditional (element 0 stands in for the ones outside),
// so that the kernel's unrolled gathers compile to a run of independent loads rather than a branch each.
template <typename T>
FCNK_HD inline acc_of<T> gather_x(const T* x, const Shape& s, const PixelTaps& p, const XTap& t, bool in_range) {
  const int32_t ih = p.ih0 + t.dh, iw = p.iw0 + t.dw;
  const bool inside =
      in_range && ih >= 0 && ih < static_cast<int32_t>(s.h) && iw >= 0 && iw < static_cast<int32_t>(s.w);
  const acc_of<T> v = to_acc(x[inside ? p.offset + t.offset : 0]);
  return inside ? v : acc_of<T>(0);
}

// Offsets of one (n, k, oh, ow) element, or of its row or column part, in dy and in the saved output y.
struct GradOffsets {
  int64_t dy, y;
};
FCNK_HD inline GradOffsets grad_offsets(const OutPixel& q, Strides dys, Strides ys) {
  return {q.n * dys.n + q.oh * dys.h + q.ow * dys.w, q.n * ys.n + q.oh * ys.h + q.ow * ys.w};
}
// The masked output gradient dy * (y > 0) (dy itself without the ReLU) at the sum of two offset parts; 0 where
// `valid` is false, loading element 0 instead (see gather_x).
template <typename T>
FCNK_HD inline acc_of<T> masked_grad(const T* dy, const T* y, bool relu, GradOffsets a, GradOffsets b,
                                     bool valid = true) {
  const acc_of<T> g = to_acc(dy[valid ? a.dy + b.dy : 0]);
  if (!relu) return valid ? g : acc_of<T>(0);
  const acc_of<T> out = to_acc(y[valid ? a.y + b.y : 0]);
  return valid && !(out <= acc_of<T>(0)) ? g : acc_of<T>(0);
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

  struct AM {  // the pixel's taps in x, and its offset in y
    PixelTaps taps;
    int64_t out;
  };
  using AK = XTap;
  using BK = int64_t;  // j
  using BN = int64_t;  // the output channel's row of the weight

  FCNK_HD void begin(int64_t z) { group = z, k_begin = 0, k_end = s.j; }
  FCNK_HD int64_t rows() const { return s.n * s.oh * s.ow; }
  FCNK_HD int64_t cols() const { return s.k_g; }
  FCNK_HD AM a_m(int64_t m) const {
    const OutPixel q = out_pixel(s, m);
    return {pixel_taps(s, xs, q), q.n * ys.n + q.oh * ys.h + q.ow * ys.w};
  }
  FCNK_HD AK a_k(int64_t j) const { return x_tap(s, xs, group, j); }
  FCNK_HD BK b_k(int64_t j) const { return j; }
  FCNK_HD BN b_n(int64_t k) const { return (group * s.k_g + k) * s.j; }
  FCNK_HD acc_of<T> a(const AM& m, const AK& j, bool in_range) const { return gather_x(x, s, m.taps, j, in_range); }
  FCNK_HD acc_of<T> b(BK j, BN k, bool in_range) const { return in_range ? to_acc(w[k + j]) : acc_of<T>(0); }
  FCNK_HD void store(const AM& am, int64_t, int64_t k, acc_of<T> v) const {
    const int64_t kk = group * s.k_g + k;
    if (bias != nullptr) v += to_acc(bias[kk]);
    if (relu) v = v < acc_of<T>(0) ? acc_of<T>(0) : v;  // NaN stays NaN, as in torch.relu
    y[am.out + kk * ys.c] = from_acc<T>(v);
  }
};

// dgrad: rows are input pixels (n, ih, iw), columns one group's input channels, reduction t = (k, r, s).
// kStrided: whether a stride is above 1, so that tapping needs a divisibility test (VGG's layers have stride 1).
template <typename T, bool kStrided>
struct Dgrad {
  using scalar_t = T;
  static constexpr bool kAFastM = true, kBFastN = false, kStoreFastM = true;
  Shape s;
  const T *dy, *y, *w;
  T* dx;
  Strides dys, ys, dxs;
  bool relu;
  int64_t group = 0, k_begin = 0, k_end = 0;

  struct AM {  // input pixel (n, ih, iw): the image's offsets, its offset in dx, ih + ph and iw + pw
    GradOffsets image;
    int64_t out;
    int32_t ohs, ows;
  };
  struct AK {  // t = (k, r, s): output channel k's offsets and the tap's reach
    GradOffsets channel;
    int32_t dh, dw;
  };
  using BK = int64_t;  // (group * K/G + k) * J + r * S + s
  using BN = int64_t;  // c * R * S

  FCNK_HD void begin(int64_t z) { group = z, k_begin = 0, k_end = s.k_g * s.r * s.s; }
  FCNK_HD int64_t rows() const { return s.n * s.h * s.w; }
  FCNK_HD int64_t cols() const { return s.c_g; }
  FCNK_HD AM a_m(int64_t m) const {
    const int64_t iw = m % s.w, ih = (m / s.w) % s.h, n = m / (s.w * s.h);
    return {{n * dys.n, n * ys.n}, n * dxs.n + ih * dxs.h + iw * dxs.w, static_cast<int32_t>(ih + s.ph),
            static_cast<int32_t>(iw + s.pw)};
  }
  FCNK_HD AK a_k(int64_t t) const {
    const int64_t sx = t % s.s, r = (t / s.s) % s.r, k = group * s.k_g + t / (s.s * s.r);
    return {{k * dys.c, k * ys.c}, static_cast<int32_t>(r * s.dh), static_cast<int32_t>(sx * s.dw)};
  }
  FCNK_HD BK b_k(int64_t t) const {
    const int64_t rs = t % (s.r * s.s), k = t / (s.r * s.s);
    return (group * s.k_g + k) * s.j + rs;
  }
  FCNK_HD BN b_n(int64_t c) const { return c * s.r * s.s; }
  // dy' at the output pixel (oh, ow) that taps input pixel m through (r, s), if there is one.
  FCNK_HD acc_of<T> a(const AM& m, const AK& t, bool in_range) const {
    int32_t oh = m.ohs - t.dh, ow = m.ows - t.dw;  // = oh * sh, ow * sw if tapped
    bool tapped = in_range && oh >= 0 && ow >= 0;
    if constexpr (kStrided) {
      const int32_t sh = static_cast<int32_t>(s.sh), sw = static_cast<int32_t>(s.sw);
      tapped = tapped && oh % sh == 0 && ow % sw == 0;
      oh /= sh, ow /= sw;
    }
    tapped = tapped && oh < static_cast<int32_t>(s.oh) && ow < static_cast<int32_t>(s.ow);
    return masked_grad(dy, y, relu, {m.image.dy + t.channel.dy, m.image.y + t.channel.y},
                       GradOffsets{oh * dys.h + ow * dys.w, oh * ys.h + ow * ys.w}, tapped);
  }
  FCNK_HD acc_of<T> b(BK t, BN c, bool in_range) const { return in_range ? to_acc(w[t + c]) : acc_of<T>(0); }
  FCNK_HD void store(const AM& am, int64_t, int64_t c, acc_of<T> v) const {
    dx[am.out + (group * s.c_g + c) * dxs.c] = from_acc<T>(v);
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

  using AM = GradOffsets;  // output channel k
  using AK = GradOffsets;  // output pixel (n, oh, ow)
  using BK = PixelTaps;    // output pixel p
  using BN = XTap;         // j

  FCNK_HD void begin(int64_t z) {
    group = z % groups, split = z / groups;
    k_begin = split * chunk;
    k_end = imin(k_begin + chunk, s.n * s.oh * s.ow);
  }
  FCNK_HD int64_t rows() const { return s.k_g; }
  FCNK_HD int64_t cols() const { return s.j; }
  FCNK_HD AM a_m(int64_t k) const {
    const int64_t kk = group * s.k_g + k;
    return {kk * dys.c, kk * ys.c};
  }
  FCNK_HD AK a_k(int64_t p) const { return grad_offsets(out_pixel(s, p), dys, ys); }
  FCNK_HD BK b_k(int64_t p) const { return pixel_taps(s, xs, out_pixel(s, p)); }
  FCNK_HD BN b_n(int64_t j) const { return x_tap(s, xs, group, j); }
  FCNK_HD acc_of<T> a(const AM& k, const AK& p, bool in_range) const {
    return masked_grad(dy, y, relu, k, p, in_range);
  }
  FCNK_HD acc_of<T> b(const BK& p, const BN& j, bool in_range) const { return gather_x(x, s, p, j, in_range); }
  FCNK_HD void store(const AM&, int64_t k, int64_t j, acc_of<T> v) const {
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
