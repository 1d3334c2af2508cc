// One pixel of the CUDA cross-entropy forward when the classes fit in registers (C <= kMaxC): the pixel's C logits
// are read once into registers, and loss and statistics, or in training loss and gradient (for an upstream gradient
// of 1), come from them. The general kernels (cross_entropy_cuda.cu) read each logit twice in training, once for
// the online softmax statistics and once more for the gradient; run 9 had that at 54 % of the H200's copy bandwidth.
// Host and device code, so that tests/test_cross_entropy_cuda_pixel.py runs it on the CPU against F.cross_entropy.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "common.h"

namespace fcnkern {
namespace ce_pixel {

// FCN's classes (21 for PASCAL VOC) and everything up to 32; wider problems take the two-sweep kernel.
constexpr int kMaxC = 32;

FCNK_HD inline float exp_of(float x) { return ::expf(x); }
FCNK_HD inline double exp_of(double x) { return ::exp(x); }
FCNK_HD inline float log_of(float x) { return ::logf(x); }
FCNK_HD inline double log_of(double x) { return ::log(x); }

// One pixel's logits (classes past C hold -inf) and softmax statistics: max m, ls = log sum exp(v - m), and xt the
// logit of class k (0 when k is -1). The register array is indexed only by unrolled constants, so that it stays in
// registers.
template <int kMax, typename acc_t>
struct Pixel {
  acc_t v[kMax];
  acc_t m, ls, xt;
};

// The label as a 32-bit class index, -1 when it is none (ignored or bad): one compare per class below.
FCNK_HD inline int class_of(int64_t label, int C) { return label >= 0 && label < C ? static_cast<int>(label) : -1; }

// fp32 accumulation, fp64 for fp64 logits (as every cross-entropy kernel here).
template <int kMax, typename scalar_t,
          typename acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>>
FCNK_HD inline Pixel<kMax, acc_t> load_pixel(const scalar_t* xp, int64_t x_sc, int C, int k) {
  constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
  Pixel<kMax, acc_t> p;
  p.m = -kInf, p.xt = 0;
  // Unconditional loads (classes past C re-read class C - 1): no branch per class, so all are in flight at once.
#pragma unroll
  for (int c = 0; c < kMax; ++c) {
    const acc_t v = static_cast<acc_t>(xp[(c < C ? c : C - 1) * x_sc]);
    p.v[c] = c < C ? v : -kInf;
    p.m = p.v[c] > p.m ? p.v[c] : p.m;
    p.xt = c == k ? p.v[c] : p.xt;
  }
  acc_t s = 0;
#pragma unroll
  for (int c = 0; c < kMax; ++c) s += c < C ? exp_of(p.v[c] - p.m) : acc_t(0);
  p.ls = log_of(s);
  return p;
}

// g, the factor of the pixel's loss and gradient: the label's class weight (1 without weights), 0 for
// ignore_index, NaN for a label outside [0, C) (see cross_entropy_cuda.cu).
template <typename acc_t>
FCNK_HD inline acc_t label_factor(int64_t label, int k, int64_t ignore_index, const acc_t* weight) {
  if (label == ignore_index) return acc_t(0);
  return k >= 0 ? (weight != nullptr ? weight[k] : acc_t(1)) : std::numeric_limits<acc_t>::quiet_NaN();
}

template <int kMax, typename acc_t>
FCNK_HD inline acc_t pixel_loss(const Pixel<kMax, acc_t>& p, int64_t label, int64_t ignore_index, acc_t g) {
  return label == ignore_index ? acc_t(0) : g * ((p.m - p.xt) + p.ls);
}

// One class's g * (softmax - onehot) from its logit v and the pixel's statistics m and ls: the expression of every
// CUDA cross-entropy gradient (this file's and cross_entropy_cuda.cu's recomputing backward), so that a gradient
// handed on by the training forward and one recomputed from saved statistics agree bit for bit.
template <typename acc_t>
FCNK_HD inline acc_t class_grad(acc_t v, acc_t m, acc_t ls, acc_t g, bool is_label) {
  const acc_t prob = exp_of((v - m) - ls);
  return g * (is_label ? prob - acc_t(1) : prob);
}

// The pixel's gradient g * (softmax - onehot(k)) into gp (class stride g_sc).
template <int kMax, typename scalar_t, typename acc_t>
FCNK_HD inline void store_pixel_grad(const Pixel<kMax, acc_t>& p, scalar_t* gp, int64_t g_sc, int C, int k,
                                     acc_t g) {
  scalar_t* out = gp;
#pragma unroll
  for (int c = 0; c < kMax; ++c, out += g_sc) {
    if (c < C) *out = static_cast<scalar_t>(class_grad(p.v[c], p.m, p.ls, g, c == k));
  }
}

}  // namespace ce_pixel
}  // namespace fcnkern
