// Per-tile math of the fused softmax cross-entropy on the CPU, shared by the plain loss (cross_entropy_cpu.cpp) and
// the fused bilinear head (upsample_ce_cpu.cpp). A tile is C x kTile fp32 (fp64) values, pixels in the vector
// lanes; every function here is always_inline so that it vectorises inside each caller's multiversioned body.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "cpu_math.h"

namespace fcnkern {
namespace ce_tile {

constexpr int64_t kTile = 64;

struct FloatMath {
  static inline __attribute__((always_inline)) float exp(float x) { return exp_approx(x); }
  // s >= 1 for finite logits (the max term contributes exp(0)); anything else came from NaN/inf logits.
  static inline __attribute__((always_inline)) float log_sum(float s) {
    return s >= 1.0f ? log_approx(s) : std::numeric_limits<float>::quiet_NaN();
  }
};
struct DoubleMath {
  static inline __attribute__((always_inline)) double exp(double x) { return std::exp(x); }
  static inline __attribute__((always_inline)) double log_sum(double s) { return std::log(s); }
};

// Per-lane class index: the label if it is in [0, C), kIgnored for ignore_index, kBadLabel otherwise. int32 so
// that compares against it run at the width of the fp32 lanes.
constexpr int32_t kIgnored = -1;
constexpr int32_t kBadLabel = -2;

// A lane's class weight (1 without weights); the index is clamped so the load is safe to if-convert.
template <typename acc_t, bool kWeighted>
inline __attribute__((always_inline)) acc_t class_weight(int32_t k, const acc_t* weight) {
  return kWeighted ? weight[k >= 0 ? k : 0] : acc_t(1);
}

// A lane's value by its label: `value` for a class, 0 for an ignored pixel, NaN for a bad label.
template <typename acc_t>
inline __attribute__((always_inline)) acc_t by_label(int32_t k, acc_t value) {
  return k >= 0 ? value : (k == kIgnored ? acc_t(0) : std::numeric_limits<acc_t>::quiet_NaN());
}

template <typename acc_t>
inline __attribute__((always_inline)) int32_t decode_labels(const int64_t* labels, int64_t C, int64_t ignore_index,
                                                              int32_t* cls) {
  int32_t bad = 0;
#pragma omp simd reduction(| : bad)
  for (int64_t j = 0; j < kTile; ++j) {
    const int64_t l = labels[j];
    const int32_t k = l == ignore_index ? kIgnored : (l >= 0 && l < C ? static_cast<int32_t>(l) : kBadLabel);
    cls[j] = k;
    bad |= k == kBadLabel;
  }
  return bad;
}

// One tile of the forward: buf holds C x kTile logits (padding lanes finite). Writes the softmax statistics (max and
// log-sum of exp(x - max)) and the weighted loss of every lane; returns nonzero if a lane had a bad label (its loss
// is NaN). Max and log-sum stay separate so that x - max is exact: folding them into one fp32 log-sum-exp loses
// its low bits for large logits (5e-4 relative at +-1e4).
// kWeighted is a template parameter, not a null check in the loop: a load through a maybe-null pointer cannot be
// if-converted, and that one branch kept GCC from vectorising the whole per-pixel epilogue.
template <typename acc_t, typename Math, bool kWeighted, bool kKeepExp>
inline __attribute__((always_inline)) int32_t fwd_tile_math(acc_t* buf, int64_t C, const int64_t* labels,
                                                              int64_t ignore_index, const acc_t* weight, acc_t* mx,
                                                              acc_t* lsum, acc_t* loss) {
  int32_t cls[kTile];
  const int32_t bad = decode_labels<acc_t>(labels, C, ignore_index, cls);
  acc_t m[kTile], s[kTile], xt[kTile];
  for (int64_t j = 0; j < kTile; ++j) {
    m[j] = buf[j];
    s[j] = 0;
    xt[j] = 0;
  }
  for (int64_t c = 1; c < C; ++c) {
    const acc_t* row = buf + c * kTile;
#pragma omp simd
    for (int64_t j = 0; j < kTile; ++j) m[j] = row[j] > m[j] ? row[j] : m[j];
  }
  for (int64_t c = 0; c < C; ++c) {
    acc_t* row = buf + c * kTile;
    const int32_t c32 = static_cast<int32_t>(c);
#pragma omp simd
    for (int64_t j = 0; j < kTile; ++j) {
      const acc_t e = Math::exp(row[j] - m[j]);
      s[j] += e;
      xt[j] = cls[j] == c32 ? row[j] : xt[j];
      if constexpr (kKeepExp) row[j] = e;
    }
  }
#pragma omp simd
  for (int64_t j = 0; j < kTile; ++j) {
    const acc_t ls = Math::log_sum(s[j]);
    const int32_t k = cls[j];
    mx[j] = m[j];
    lsum[j] = ls;
    loss[j] = by_label(k, class_weight<acc_t, kWeighted>(k, weight) * ((m[j] - xt[j]) + ls));
  }
  return bad;
}

// One tile of the backward, in place: buf holds the logits on entry and their gradient on exit.
template <typename acc_t, typename Math, bool kWeighted>
inline __attribute__((always_inline)) void bwd_tile_math(acc_t* buf, int64_t C, const int64_t* labels,
                                                           int64_t ignore_index, const acc_t* weight,
                                                           const acc_t* mx, const acc_t* lsum,
                                                           const acc_t* grad_loss) {
  int32_t cls[kTile];
  acc_t g[kTile];
  decode_labels<acc_t>(labels, C, ignore_index, cls);
#pragma omp simd
  for (int64_t j = 0; j < kTile; ++j) {
    const int32_t k = cls[j];
    g[j] = by_label(k, grad_loss[j] * class_weight<acc_t, kWeighted>(k, weight));
  }
  for (int64_t c = 0; c < C; ++c) {
    acc_t* row = buf + c * kTile;
    const int32_t c32 = static_cast<int32_t>(c);
#pragma omp simd
    for (int64_t j = 0; j < kTile; ++j) {
      const acc_t p = Math::exp((row[j] - mx[j]) - lsum[j]);
      row[j] = g[j] * (cls[j] == c32 ? p - acc_t(1) : p);
    }
  }
}

// Gradient of a tile whose buf holds exp(x - max) (kept by the forward sweep), in place, for upstream gradient 1:
// p = e / s, so no second exp per logit.
template <typename acc_t, typename Math, bool kWeighted>
inline __attribute__((always_inline)) void grad_from_exp_math(acc_t* buf, int64_t C, const int64_t* labels,
                                                                int64_t ignore_index, const acc_t* weight,
                                                                const acc_t* lsum) {
  int32_t cls[kTile];
  acc_t g[kTile], inv_s[kTile];
  decode_labels<acc_t>(labels, C, ignore_index, cls);
#pragma omp simd
  for (int64_t j = 0; j < kTile; ++j) {
    const int32_t k = cls[j];
    g[j] = by_label(k, class_weight<acc_t, kWeighted>(k, weight));
    inv_s[j] = Math::exp(-lsum[j]);
  }
  for (int64_t c = 0; c < C; ++c) {
    acc_t* row = buf + c * kTile;
    const int32_t c32 = static_cast<int32_t>(c);
#pragma omp simd
    for (int64_t j = 0; j < kTile; ++j) {
      const acc_t p = row[j] * inv_s[j];
      row[j] = g[j] * (cls[j] == c32 ? p - acc_t(1) : p);
    }
  }
}

// Forward of one tile; with keep_exp, buf is left holding exp(x - max) for fwd_grad_tile.
template <typename acc_t, typename Math>
inline __attribute__((always_inline)) int32_t fwd_tile_dispatch(acc_t* buf, int64_t C, const int64_t* labels,
                                                                  int64_t ignore_index, const acc_t* w, acc_t* mx,
                                                                  acc_t* lsum, acc_t* loss, bool keep_exp) {
  if (keep_exp) {
    return w ? fwd_tile_math<acc_t, Math, true, true>(buf, C, labels, ignore_index, w, mx, lsum, loss)
             : fwd_tile_math<acc_t, Math, false, true>(buf, C, labels, ignore_index, w, mx, lsum, loss);
  }
  return w ? fwd_tile_math<acc_t, Math, true, false>(buf, C, labels, ignore_index, w, mx, lsum, loss)
           : fwd_tile_math<acc_t, Math, false, false>(buf, C, labels, ignore_index, w, mx, lsum, loss);
}

}  // namespace ce_tile
}  // namespace fcnkern
