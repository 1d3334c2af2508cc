// What each thread of the CUDA upsampling kernels (cpp/upsample_cuda.cu) computes for its one output element, as
// host-and-device code: the kernels call these in grid-stride loops, and tests/test_upsample_cuda_elements.py calls
// them on the CPU for every element, so that the gather arithmetic is checked where no GPU is available.
#pragma once

#include <cstdint>
#include <type_traits>

#include "common.h"
#include "fast_div.h"
#include "upsample.h"


namespace fcnkern {
namespace up_elements {

template <typename index_t>
struct StridesOf {
  index_t n, c, h, w;
  FCNK_HD index_t at(index_t ni, index_t ci, index_t hi, index_t wi) const {
    return ni * n + ci * c + hi * h + wi * w;
  }
};
using Strides4 = StridesOf<int64_t>;

// k(t) = 1 - |t - (f - 1/2)| / f: the weight of tap t in [0, 2f) of the bilinear kernel of factor f, given 1 / f.
// A multiplication, not a division: an IEEE division is a dozen instructions on the GPU, and run 9 (H200) found
// the forward issue-bound at ~130 instructions per output with four of them per output, the backward passes with
// one per tap. The weights move by an ulp or two.
template <typename acc_t, typename index_t>
FCNK_HD inline acc_t bilinear_weight(index_t t, index_t factor, acc_t inv_factor) {
  const acc_t d = acc_t(t) - (acc_t(factor) - acc_t(0.5));
  return acc_t(1) - (d < acc_t(0) ? -d : d) * inv_factor;
}

// The two taps along one axis of full-output coordinate `full`: inputs i1 = full / f and i1 - 1, with weights
// k(d) = (d + 1/2) / f and k(d + f) = 1 - k(d) for d = full - i1 f in [0, f). Zero for a tap outside [0, size).
template <typename acc_t, typename index_t, typename div_t>
struct BilinearTaps {
  index_t i0, i1;
  acc_t w0, w1;
  FCNK_HD BilinearTaps(index_t full, const div_t& f, acc_t inv_f, index_t size) {
    i1 = f.div(full);
    i0 = i1 - 1;
    const acc_t k = (acc_t(full - i1 * f.d) + acc_t(0.5)) * inv_f;
    w1 = i1 < size ? k : acc_t(0);
    w0 = i0 >= 0 ? acc_t(1) - k : acc_t(0);
  }
  // Indices clamped into the input: a tap outside it has weight 0 and reads a valid element.
  FCNK_HD index_t c0() const { return i0 >= 0 ? i0 : 0; }
  FCNK_HD index_t c1(index_t size) const { return i1 < size ? i1 : size - 1; }
};

// 1 / factor, rounded once on the host for each accumulation type (a multiplication per tap, not a division).
struct InvFactor {
  float f32;
  double f64;
  static InvFactor of(int64_t factor) { return {float(1.0 / double(factor)), 1.0 / double(factor)}; }
  template <typename acc_t>
  FCNK_HD acc_t get() const {
    if constexpr (sizeof(acc_t) == sizeof(double)) {
      return f64;
    } else {
      return f32;
    }
  }
};

// The bilinear forward's sizes in index_t with div_t dividers (cpp/fast_div.h): FastDiv32 and int32_t where every
// index and offset fits (bilinear_fwd_fits_32bit), else PlainDiv64 and int64_t.
template <typename index_t, typename div_t>
struct BilinearFwdPlan {
  div_t oh, c, f;  // dividers by OH, C and the factor (rows are decoded, columns walked)
  index_t H, W, OW, top, left;
  StridesOf<index_t> xs, os;
  InvFactor inv;
};

// t's four strides in index_t.
template <typename index_t>
inline StridesOf<index_t> strides_in(const at::Tensor& t) {
  return {index_t(t.stride(0)), index_t(t.stride(1)), index_t(t.stride(2)), index_t(t.stride(3))};
}

inline bool fits_int32(const at::Tensor& t) {
  int64_t last = 0;  // the largest element offset
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  return t.numel() < (int64_t(1) << 31) && last < (int64_t(1) << 31);
}

// Whether the 32-bit plan holds every index of this forward: element counts, offsets and full-output coordinates.
inline bool bilinear_fwd_fits_32bit(const at::Tensor& x, const at::Tensor& out, int64_t factor) {
  constexpr int64_t kLimit = int64_t(1) << 31;
  return fits_int32(x) && fits_int32(out) && (x.size(2) + 1) * factor < kLimit && (x.size(3) + 1) * factor < kLimit;
}

template <typename index_t, typename div_t>
BilinearFwdPlan<index_t, div_t> bilinear_fwd_plan(const at::Tensor& x, const at::Tensor& out, int64_t factor,
                                                  int64_t top, int64_t left) {
  return {div_t(index_t(out.size(2))), div_t(index_t(out.size(1))), div_t(index_t(factor)),
          index_t(x.size(2)),          index_t(x.size(3)),          index_t(out.size(3)),
          index_t(top),                index_t(left),               strides_in<index_t>(x),
          strides_in<index_t>(out),    InvFactor::of(factor)};
}

// The taps of one output row `row` = (n, c, oy) of the bilinear forward's N x C x OH x OW window at (top, left):
// the offsets of its two input rows and of itself, and the two rows' weights.
template <typename acc_t, typename index_t>
struct BilinearRowTaps {
  index_t src0, src1, dst;
  acc_t w0, w1;
};

template <typename acc_t, typename index_t, typename div_t>
FCNK_HD inline BilinearRowTaps<acc_t, index_t> bilinear_row_taps(index_t row,
                                                                  const BilinearFwdPlan<index_t, div_t>& p) {
  const index_t q = p.oh.div(row), n = p.c.div(q);
  const index_t oy = row - q * p.oh.d, c = q - n * p.c.d;
  const BilinearTaps<acc_t, index_t, div_t> r(p.top + oy, p.f, p.inv.template get<acc_t>(), p.H);
  return {p.xs.at(n, c, r.c0(), 0), p.xs.at(n, c, r.c1(p.H), 0), p.os.at(n, c, oy, 0), r.w0, r.w1};
}

// Bilinear forward of `count` output rows, given their taps, at columns ox = first, first + step, ... below OW (a
// thread's share; the kernel spreads the columns over a block's threads and gives a block kBilinearTileRows rows).
// Each column's two input columns and weights are worked out once for all the rows, each row's once per block
// (bilinear_row_taps, in shared memory), so an output costs its four loads, three multiply-adds and a store. Run 11
// (H200) measured the forward issue-bound (78 % SM throughput, 17.5 % DRAM) when each row was a block's alone:
// 500 columns over 256 threads decoded each row and each column's taps for two outputs per thread.
template <typename scalar_t, typename acc_t, typename index_t, typename div_t>
FCNK_HD inline void bilinear_fwd_rows(const BilinearRowTaps<acc_t, index_t>* rows, index_t count, index_t first,
                                      index_t step, const scalar_t* x, scalar_t* out,
                                      const BilinearFwdPlan<index_t, div_t>& p) {
  // An unsigned counter in the 32-bit plan: ox < OW < 2^31 and step is a block's width, so ox + step cannot wrap.
  using counter_t = std::conditional_t<sizeof(index_t) == 4, uint32_t, int64_t>;
  const acc_t inv_f = p.inv.template get<acc_t>();
  for (counter_t ox = counter_t(first); ox < counter_t(p.OW); ox += counter_t(step)) {
    const BilinearTaps<acc_t, index_t, div_t> k(p.left + index_t(ox), p.f, inv_f, p.W);
    const index_t c0 = k.c0() * p.xs.w, c1 = k.c1(p.W) * p.xs.w, o = index_t(ox) * p.os.w;
    for (index_t i = 0; i < count; ++i) {
      const BilinearRowTaps<acc_t, index_t> r = rows[i];
      const acc_t above = k.w0 * static_cast<acc_t>(x[r.src0 + c0]) + k.w1 * static_cast<acc_t>(x[r.src0 + c1]);
      const acc_t below = k.w0 * static_cast<acc_t>(x[r.src1 + c0]) + k.w1 * static_cast<acc_t>(x[r.src1 + c1]);
      out[r.dst + o] = static_cast<scalar_t>(r.w0 * above + r.w1 * below);
    }
  }
}

// One transpose pass of the bilinear backward along AXIS (2: height, 3: width) over the N x C x D2 x D3
// destination, in index_t with div_t dividers like the forward's plan (FastDiv32 and int32_t where every index
// fits, bilinear_bwd_fits_32bit; else PlainDiv64 and int64_t): src's taps along AXIS start at `start` and number
// `length`.
template <typename index_t, typename div_t>
struct BilinearAxisPlan {
  div_t d3, d2, c;  // dividers of an element's decode into (n, c, a2, a3)
  index_t factor, start, length;
  StridesOf<index_t> ss, ds;
  InvFactor inv;
};

// Whether the 32-bit plan holds both passes' indices: element counts and offsets of the gradient, the height
// pass's intermediate and dx, and the full-output coordinates i * f + t.
inline bool bilinear_bwd_fits_32bit(const at::Tensor& grad, const at::Tensor& by_row, const at::Tensor& dx,
                                    int64_t factor) {
  constexpr int64_t kLimit = int64_t(1) << 31;
  return fits_int32(grad) && fits_int32(by_row) && fits_int32(dx) && (dx.size(2) + 2) * factor < kLimit &&
         (dx.size(3) + 2) * factor < kLimit;
}

template <typename index_t, typename div_t>
BilinearAxisPlan<index_t, div_t> bilinear_axis_plan(const at::Tensor& src, const at::Tensor& dst, int64_t factor,
                                                    int64_t start, int64_t length) {
  return {div_t(index_t(dst.size(3))), div_t(index_t(dst.size(2))), div_t(index_t(dst.size(1))),
          index_t(factor),             index_t(start),              index_t(length),
          strides_in<index_t>(src),    strides_in<index_t>(dst),    InvFactor::of(factor)};
}

// Element idx of the destination: dst[.., i, ..] = sum over t in [0, 2f) of k(t) * src[.., i f + t - start, ..]
// where that index lies in [0, length). The taps' range is worked out once (no bounds test per tap), and the
// decode is three multiply-shift divisions in the 32-bit plan, where four 64-bit divisions per element (~70
// instructions each) came before the 2f taps.
template <int AXIS, typename src_t, typename dst_t, typename acc_t, typename index_t, typename div_t>
FCNK_HD inline void bilinear_bwd_axis_element(index_t idx, const src_t* src, dst_t* dst,
                                              const BilinearAxisPlan<index_t, div_t>& p) {
  const index_t q3 = p.d3.div(idx), a3 = idx - q3 * p.d3.d;
  const index_t q2 = p.d2.div(q3), a2 = q3 - q2 * p.d2.d;
  const index_t n = p.c.div(q2), c = q2 - n * p.c.d;
  const index_t first = (AXIS == 2 ? a2 : a3) * p.factor - p.start;  // src index of tap t = 0
  const index_t t0 = first < 0 ? -first : 0, t1 = p.length - first < 2 * p.factor ? p.length - first : 2 * p.factor;
  const index_t step = AXIS == 2 ? p.ss.h : p.ss.w;
  const src_t* base = src + (AXIS == 2 ? p.ss.at(n, c, 0, a3) : p.ss.at(n, c, a2, 0));
  const acc_t inv_f = p.inv.template get<acc_t>();
  acc_t acc = 0;
  for (index_t t = t0; t < t1; ++t) {
    acc += bilinear_weight<acc_t>(t, p.factor, inv_f) * static_cast<acc_t>(base[(first + t) * step]);
  }
  dst[p.ds.at(n, c, a2, a3)] = static_cast<dst_t>(acc);
}

// Learned forward, output element idx of N x Cout x oh x ow: its group's input channels, and only the sub-kernel
// taps ky = Y mod sh + t sh, kx = X mod sw + u sw that reach it.
template <typename scalar_t, typename acc_t>
FCNK_HD inline void learned_fwd_element(int64_t idx, const scalar_t* x, Strides4 xs, const scalar_t* w, Strides4 ws,
                                        const scalar_t* bias, scalar_t* out, Strides4 os, const UpGeometry& g) {
  const int64_t ox = idx % g.ow, oy = (idx / g.ow) % g.oh, co = (idx / (g.ow * g.oh)) % g.cout;
  const int64_t n = idx / (g.ow * g.oh * g.cout), group = co / g.cout_g, col = co % g.cout_g;
  const int64_t Y = g.top + oy, X = g.left + ox;
  // Taps reaching Y: ky = Y mod sh + t sh < kh, reading input row i = Y / sh - t (decreasing in t). The divisions
  // are hoisted out of the channel loop: 64-bit division is a subroutine call on the GPU, and inside the loop it
  // made ptxas spill.
  const int64_t ky0 = Y % g.sh, i0 = Y / g.sh, kx0 = X % g.sw, j0 = X / g.sw;
  acc_t acc = bias != nullptr ? static_cast<acc_t>(bias[co]) : acc_t(0);
  for (int64_t cl = 0; cl < g.cin_g; ++cl) {
    const int64_t ci = group * g.cin_g + cl;
    for (int64_t ky = ky0, i = i0; ky < g.kh && i >= 0; ky += g.sh, --i) {
      if (i >= g.h) continue;
      for (int64_t kx = kx0, j = j0; kx < g.kw && j >= 0; kx += g.sw, --j) {
        if (j >= g.w) continue;
        acc += static_cast<acc_t>(x[xs.at(n, ci, i, j)]) * static_cast<acc_t>(w[ws.at(ci, col, ky, kx)]);
      }
    }
  }
  out[os.at(n, co, oy, ox)] = static_cast<scalar_t>(acc);
}

// Learned dgrad, input element idx of N x Cin x h x w: the kept gradient over the kh x kw outputs it reaches.
template <typename scalar_t, typename acc_t>
FCNK_HD inline void learned_dgrad_element(int64_t idx, const scalar_t* dy, Strides4 gs, const scalar_t* w,
                                          Strides4 ws, scalar_t* dx, Strides4 dxs, const UpGeometry& g) {
  const int64_t j = idx % g.w, i = (idx / g.w) % g.h, ci = (idx / (g.w * g.h)) % g.cin;
  const int64_t n = idx / (g.w * g.h * g.cin), group = ci / g.cin_g;
  acc_t acc = 0;
  for (int64_t col = 0; col < g.cout_g; ++col) {
    const int64_t co = group * g.cout_g + col;
    for (int64_t ky = 0; ky < g.kh; ++ky) {
      const int64_t oy = i * g.sh + ky - g.top;
      if (oy < 0) continue;
      if (oy >= g.oh) break;
      for (int64_t kx = 0; kx < g.kw; ++kx) {
        const int64_t ox = j * g.sw + kx - g.left;
        if (ox < 0) continue;
        if (ox >= g.ow) break;
        acc += static_cast<acc_t>(dy[gs.at(n, co, oy, ox)]) * static_cast<acc_t>(w[ws.at(ci, col, ky, kx)]);
      }
    }
  }
  dx[dxs.at(n, ci, i, j)] = static_cast<scalar_t>(acc);
}

// Learned wgrad: input pixel p's term of weight element e (ci, col, ky, kx) of the Cin x Cout_g x kh x kw
// gradient, x[n, ci, i, j] * dy[n, co, i sh + ky - top, j sw + kx - left], 0 where that output is not kept.
template <typename scalar_t, typename acc_t>
FCNK_HD inline acc_t learned_wgrad_term(int64_t e, int64_t p, const scalar_t* dy, Strides4 gs, const scalar_t* x,
                                        Strides4 xs, const UpGeometry& g) {
  const int64_t kx = e % g.kw, ky = (e / g.kw) % g.kh, col = (e / (g.kw * g.kh)) % g.cout_g;
  const int64_t ci = e / (g.kw * g.kh * g.cout_g), co = (ci / g.cin_g) * g.cout_g + col;
  const int64_t j = p % g.w, i = (p / g.w) % g.h, n = p / (g.w * g.h);
  const int64_t oy = i * g.sh + ky - g.top, ox = j * g.sw + kx - g.left;
  if (oy < 0 || oy >= g.oh || ox < 0 || ox >= g.ow) return acc_t(0);
  return static_cast<acc_t>(x[xs.at(n, ci, i, j)]) * static_cast<acc_t>(dy[gs.at(n, co, oy, ox)]);
}

}  // namespace up_elements
}  // namespace fcnkern
