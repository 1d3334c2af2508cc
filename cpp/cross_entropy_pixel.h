// One pixel of the CUDA cross-entropy forward in training when the classes fit in registers (C <= kMaxC): the
// pixel's C logits are read once into registers, and loss and gradient (for an upstream gradient of 1) come from
// them. The general kernel (cross_entropy_cuda.cu) reads each logit twice, once for the online softmax statistics
// and once more for the gradient; run 9 had it at 54 % of the H200's copy bandwidth. Host and device code, so that
// tests/test_cross_entropy_cuda_pixel.py runs it on the CPU against F.cross_entropy.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "common.h"

namespace fcnkern {
namespace ce_pixel {

// FCN's classes (21 for PASCAL VOC) and everything up to 32; wider problems take the two-sweep kernel.
constexpr int kMaxC = 32;

FCNK_HD inline float exp_of(float x) { return ::expf(x); }
FCNK_HD inline double exp_of(double x) { return ::exp(x); }
FCNK_HD inline float log_of(float x) { return ::logf(x); }
FCNK_HD inline double log_of(double x) { return ::log(x); }

// The loss of the pixel whose C logits start at xp (class stride x_sc), and its gradient into gp (class stride
// g_sc): g * (softmax - onehot(label)), g the label's class weight (1 without weights), 0 for ignore_index and NaN
// for a label outside [0, C) (then the loss is NaN too: see cross_entropy_cuda.cu). A logit that is NaN or +inf
// makes the pixel's loss and gradient NaN, as the two-sweep kernel's do. The register array is indexed only by
// unrolled constants, so that it stays in registers.
template <int kMax, typename scalar_t, typename acc_t>
FCNK_HD inline acc_t loss_and_grad(const scalar_t* xp, int64_t x_sc, scalar_t* gp, int64_t g_sc, int C,
                                   int64_t label, int64_t ignore_index, const acc_t* weight) {
  constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
  // The label as a 32-bit class index, -1 when it is none (ignored or bad): one compare per class below.
  const int k = label >= 0 && label < C ? static_cast<int>(label) : -1;
  acc_t e[kMax];
  acc_t m = -kInf, xt = 0;
  // Unconditional loads (classes past C re-read class C - 1): no branch per class, so all are in flight at once.
#pragma unroll
  for (int c = 0; c < kMax; ++c) {
    const acc_t v = static_cast<acc_t>(xp[(c < C ? c : C - 1) * x_sc]);
    e[c] = c < C ? v : -kInf;
    m = e[c] > m ? e[c] : m;
    xt = c == k ? e[c] : xt;
  }
  acc_t s = 0;
#pragma unroll
  for (int c = 0; c < kMax; ++c) {
    e[c] = c < C ? exp_of(e[c] - m) : acc_t(0);
    s += e[c];
  }
  acc_t g = 0, loss = 0;
  if (label != ignore_index) {
    g = k >= 0 ? (weight != nullptr ? weight[k] : acc_t(1)) : std::numeric_limits<acc_t>::quiet_NaN();
    loss = g * ((m - xt) + log_of(s));
  }
  const acc_t scale = g / s;  // g * softmax = e * scale
  scalar_t* out = gp;
#pragma unroll
  for (int c = 0; c < kMax; ++c, out += g_sc) {
    if (c < C) *out = static_cast<scalar_t>(c == k ? e[c] * scale - g : e[c] * scale);
  }
  return loss;
}

}  // namespace ce_pixel
}  // namespace fcnkern
