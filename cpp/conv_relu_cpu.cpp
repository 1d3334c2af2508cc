// CPU kernels of the fused Conv2d + ReLU (fcnkern.conv2d_relu): blocked im2col + the BLAS GEMM ATen links.
//
// 3 x 3, stride 1, dilation 1, >= 64 channels per group in and out (VGG's conv1_2 .. conv5_3) and at least 1e8
// multiply-adds per tap: Winograd, 2.25x fewer multiplications (conv_relu_winograd_cpu.cpp): F(2 x 2, 3 x 3) for the
// forward and dx, F(3 x 3, 2 x 2) for dW.
// Stride 1, dilation 1, a kernel larger than 1 x 1, at most 64 channels reduced: register-blocked direct
// convolution (conv_relu_blocked_cpu.cpp) for the forward, dx and dW, where GEMMs over so few channels run far
// below the FMA peak.
// What follows is for every other geometry, and for the non-finite inputs Winograd declines.
// Forward, stride 1: shifted GEMMs over a padded copy, no im2col (forward_shifted), for 1 x 1 kernels with >= 32
// channels per group and larger ones with >= 256 on maps of >= 1024 pixels (use_shifted).
// Otherwise, per (image, group, block of output pixels): gather the block's im2col columns (J = C/G * R * S rows,
// one column per pixel) into a thread-local buffer sized to stay in L2, multiply by the group's weight (K/G x J)
// into a thread-local output block, then add the bias, apply the ReLU and store in the output's dtype and memory
// format while the block is still in cache: the pre-ReLU tensor never exists in memory.
//
// Backward, stride 1 with a 1 x 1 kernel, or >= 256 channels per group in and out on maps of >= 2048 pixels: shifted
// GEMMs again (backward_shifted), no im2col or col2im.
// Otherwise, per (image, group, band of whole output rows): load the output-gradient block once through the ReLU
// mask of the saved output (dy * (y > 0), in fp32), and feed that one block to both gradient GEMMs: dW += dY' cols^T
// (per-thread accumulators, summed at the end) and dcols = W^T dY', scattered back into dx (col2im). Bands of
// even index run in parallel, then the odd ones: a band's input footprint overlaps only its neighbours', so the
// col2im adds never race, and the result does not depend on the thread count.
//
// Inputs may have any strides (NCHW, channels_last, views): the gathers and stores go through strides. Everything
// is accumulated in fp32 (fp64 for fp64), fp16/bf16 converted at the gather and the store.
#include <ATen/core/Tensor.h>
#include <ATen/ops/col2im.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/im2col.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/threshold_backward.h>
#include <ATen/ops/zeros.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <string_view>
#include <type_traits>
#include <vector>

#include "common.h"
#include "conv_relu.h"
#include "conv_relu_blocked_cpu.h"
#include "conv_relu_winograd_cpu.h"
#include "cpu_rows.h"
#include "cpu_tasks.h"

namespace fcnkern {
namespace {

// The bytes a block's GEMM operands should take: FCNKERN_CONV_BLOCK_KB (default 1536 KiB, most of a 2 MiB L2),
// read per call for A/B measurements in one process.
int64_t pixel_block_budget() {
  const char* v = std::getenv("FCNKERN_CONV_BLOCK_KB");
  return std::max<int64_t>(v != nullptr ? std::atoll(v) : 1536, 16) << 10;
}

// Pixels per block: the im2col buffer (J x block, fp32) at about the budget, a multiple of 16, 256..8192.
int64_t pixel_block(const ConvGeometry& g, int64_t elem_bytes) {
  const int64_t fit = pixel_block_budget() / std::max<int64_t>(g.j * elem_bytes, 1);
  return std::clamp<int64_t>(fit / 16 * 16, 256, 8192);
}

// Calls fn(q, oh, ow0, len) for each run of a pixel block that lies in one output row: the block's pixels
// q .. q + len - 1 are (oh, ow0 .. ow0 + len - 1). Inner loops over a run are plain strided loops that vectorise.
template <typename Fn>
inline void for_each_row_run(const ConvGeometry& g, int64_t p0, int64_t count, Fn&& fn) {
  int64_t q = 0, oh = p0 / g.ow, ow = p0 % g.ow;
  while (q < count) {
    const int64_t len = std::min(g.ow - ow, count - q);
    fn(q, oh, ow, len);
    q += len, ++oh, ow = 0;
  }
}

// Output columns ow whose input column ow * sw - pw + s * dw lies inside [0, w): the range [lo, hi).
inline std::pair<int64_t, int64_t> valid_columns(const ConvGeometry& g, int64_t s) {
  const int64_t offset = s * g.dil_w - g.pad_w;  // iw = ow * sw + offset
  const int64_t lo = offset >= 0 ? 0 : (-offset + g.stride_w - 1) / g.stride_w;
  const int64_t last = g.w - 1 - offset;
  const int64_t hi = last < 0 ? 0 : last / g.stride_w + 1;
  return {lo, std::max(lo, std::min(hi, g.ow))};
}

// fn(i) for i in [0, rows), rows of `row_elems` elements, spread over ATen's threads where the caller is not in a
// parallel region itself (run_tasks did not spread its tasks: one block, a small map), else inline. A small map's
// one block was otherwise copied, stored and scattered by one thread while the other waited for the GEMM (perf:
// 1 x 128 x 38 x 10 forward, im2col a third of the samples, OpenMP's idle wait another third).
template <typename Fn>
void for_rows(int64_t rows, int64_t row_elems, const Fn& fn) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(row_elems, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) fn(i);
  });
}

// dst[0, len) = src[0, len). The runs of a narrow map are a few values long, where std::copy's memmove call per run
// cost more than the copy (memmove and its PLT stub a third of the im2col of a 1 x 128 x 223 x 5 frame strip);
// GCC would turn a plain loop back into that call, hence the fixed-size chunks.
template <typename T>
inline void copy_run(const T* src, int64_t len, T* dst) {
  if (len >= 64) {
    std::copy(src, src + len, dst);
    return;
  }
  int64_t i = 0;
  for (; i + 8 <= len; i += 8) __builtin_memcpy(dst + i, src + i, 8 * sizeof(T));
  for (; i + 2 <= len; i += 2) __builtin_memcpy(dst + i, src + i, 2 * sizeof(T));
  if (i < len) dst[i] = src[i];
}

// cols[jj][q] = x[n, group * c_g + c, oh * sh - ph + r * dh, ow * sw - pw + s * dw] for the `count` output pixels
// starting at p0 (row-major over oh, ow), jj = (c, r, s); 0 outside the input.
template <typename scalar_t, typename acc_t>
void im2col(const scalar_t* x, const int64_t* xs, const ConvGeometry& g, int64_t n, int64_t group, int64_t p0,
            int64_t count, acc_t* cols) {
  const scalar_t* xn = x + n * xs[0] + group * g.c_g * xs[1];
  const int64_t step = g.stride_w * xs[3];
  for_rows(g.j, count, [&](int64_t jj) {
    const int64_t c = jj / (g.r * g.s), r = (jj / g.s) % g.r, s = jj % g.s;
    const auto [lo, hi] = valid_columns(g, s);
    const scalar_t* xc = xn + c * xs[1] + (s * g.dil_w - g.pad_w) * xs[3];
    acc_t* out = cols + jj * count;
    for_each_row_run(g, p0, count, [&](int64_t q, int64_t oh, int64_t ow0, int64_t len) {
      acc_t* dst = out + q - ow0;  // dst[ow] for ow in [ow0, ow0 + len)
      const int64_t ih = oh * g.stride_h - g.pad_h + r * g.dil_h, end = ow0 + len;
      if (ih < 0 || ih >= g.h) {
        std::fill(dst + ow0, dst + end, acc_t(0));
        return;
      }
      const int64_t a = std::clamp(lo, ow0, end), b = std::clamp(hi, a, end);
      std::fill(dst + ow0, dst + a, acc_t(0));
      const scalar_t* src = xc + ih * xs[2];
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        if (step == 1) {
          copy_run(src + a, b - a, dst + a);
        } else {
          for (int64_t ow = a; ow < b; ++ow) dst[ow] = src[ow * step];
        }
      } else {
        for (int64_t ow = a; ow < b; ++ow) dst[ow] = static_cast<acc_t>(src[ow * step]);
      }
      std::fill(dst + b, dst + end, acc_t(0));
    });
  });
}

// The transpose of im2col: dx[...] += dcols[jj][q]. Callers guarantee no other thread touches the same rows.
template <typename acc_t>
void col2im_add(const acc_t* dcols, const ConvGeometry& g, int64_t group, int64_t p0, int64_t count, acc_t* dx_img) {
  // dx_img: this image's c x h x w gradient, contiguous, in acc_t. A channel's taps add to its own rows only, so the
  // channels are the rows for_rows spreads.
  const int64_t taps = g.r * g.s;
  for_rows(g.c_g, taps * count, [&](int64_t c) {
    for (int64_t jj = c * taps; jj < (c + 1) * taps; ++jj) {
      const int64_t r = (jj / g.s) % g.r, s = jj % g.s;
      const auto [lo, hi] = valid_columns(g, s);
      acc_t* dc = dx_img + (group * g.c_g + c) * g.h * g.w + (s * g.dil_w - g.pad_w);
      const acc_t* in = dcols + jj * count;
      for_each_row_run(g, p0, count, [&](int64_t q, int64_t oh, int64_t ow0, int64_t len) {
        const int64_t ih = oh * g.stride_h - g.pad_h + r * g.dil_h;
        if (ih < 0 || ih >= g.h) return;
        const int64_t a = std::clamp(lo, ow0, ow0 + len), b = std::clamp(hi, a, ow0 + len);
        const acc_t* src = in + q - ow0;
        acc_t* dst = dc + ih * g.w;
        if constexpr (std::is_same_v<acc_t, float>) {
          if (g.stride_w == 1) return add_row_f(src + a, b - a, dst + a);
        }
        for (int64_t ow = a; ow < b; ++ow) dst[ow * g.stride_w] += src[ow];
      });
    }
  });
}

template <typename scalar_t, typename acc_t>
void forward_impl(const at::Tensor& x, const at::Tensor& w_acc, const std::optional<at::Tensor>& bias,
                  const at::Tensor& y, const ConvGeometry& g, bool relu) {
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t pixels = g.oh * g.ow, block = std::min(pixel_block(g, sizeof(acc_t)), pixels);
  const int64_t blocks = (pixels + block - 1) / block;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* yp = y.mutable_data_ptr<scalar_t>();
  const int64_t xs[4] = {x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
  const int64_t ys[4] = {y.stride(0), y.stride(1), y.stride(2), y.stride(3)};
  at::Tensor bias_acc = bias.has_value() ? bias->to(acc).contiguous() : at::Tensor();
  const acc_t* bp = bias_acc.defined() ? bias_acc.const_data_ptr<acc_t>() : nullptr;

  const int64_t tasks = g.n * g.groups * blocks;
  const ThreadScratch scratch(spread_tasks(tasks), (g.j + g.k_g) * block, x.options().dtype(acc));
  run_tasks(tasks, scratch.spread, [&](int64_t begin, int64_t end) {
    acc_t* const cols = scratch.mine<acc_t>();
    acc_t* const out = cols + g.j * block;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task % blocks, group = (task / blocks) % g.groups, n = task / (blocks * g.groups);
      const int64_t p0 = b * block, count = std::min(block, pixels - p0);
      im2col(xp, xs, g, n, group, p0, count, cols);
      auto out_m = matrix(out, g.k_g, count, acc);
      mm_into(out_m, w_acc[group], matrix(cols, g.j, count, acc), true);
      // Epilogue while the block is in cache: bias, ReLU, conversion, strided store (any memory format).
      for_rows(g.k_g, count, [&](int64_t kk) {
        const int64_t k = group * g.k_g + kk;
        const acc_t add = bp != nullptr ? bp[k] : acc_t(0);
        const acc_t* src = out + kk * count;
        scalar_t* dst = yp + n * ys[0] + k * ys[1];
        for_each_row_run(g, p0, count, [&](int64_t q, int64_t oh, int64_t ow0, int64_t len) {
          scalar_t* row = dst + oh * ys[2] + ow0 * ys[3];
          const acc_t* in = src + q;
          if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
            if (ys[3] == 1) return bias_relu_row_f(in, add, relu, len, row);
          }
          if (relu) {
            for (int64_t i = 0; i < len; ++i) row[i * ys[3]] = static_cast<scalar_t>(std::max(in[i] + add, acc_t(0)));
          } else {
            for (int64_t i = 0; i < len; ++i) row[i * ys[3]] = static_cast<scalar_t>(in[i] + add);
          }
        });
      });
    }
  });
}

// Stride-1 forward without im2col ("shifted GEMMs"): on an input copy zero-padded to wp = w + 2 pw columns (plus one
// spare row), output pixel (oh, ow) at wide column q = oh * wp + ow reads tap (r, s) at padded column
// q + r * dh * wp + s * dw. So each tap is one GEMM W_rs (K/G x C/G) @ Xp[:, q0 + offset : + count] over a plain
// strided view, accumulated into an L2-resident output block; the wp - ow columns per row past the output are
// computed and dropped (2 pw / wp of the work). Measured against the im2col path (64-512 channels, 3x3): 15-25%
// faster, since the K x pixels im2col matrix is never written. Used for stride 1 with >= 32 channels per group and
// kernels up to 3 x 3; fewer channels make K too short for an efficient GEMM (RGB layers keep im2col's 27-deep reduction).
// Large kernels on small maps (fc6: 7x7 on 22 x 22) stay on im2col: 49 short GEMMs and a permuted weight copy
// per call lose to one deep GEMM (measured 519 vs 12 ms for 7x7 on 7 x 7).
// FCNKERN_CONV_SHIFTED: "0" forces im2col both ways, "fwd" keeps every backward on im2col, "all" takes the shifted
// backward wherever the forward is shifted (the tests reach it on small shapes that way). Read per call, for A/B
// measurements in one process.
bool use_shifted(const ConvGeometry& g, bool backward) {
  const std::string_view mode = env_setting("FCNKERN_CONV_SHIFTED");
  if (mode == "0" || (backward && mode == "fwd")) return false;
  const bool eligible = g.stride_h == 1 && g.stride_w == 1 && g.c_g >= 32 && g.r * g.s <= 9 &&
                        g.oh * (g.w + 2 * g.pad_w) >= 256;
  if (mode == "all" || !eligible) return eligible;
  // A 1 x 1 kernel has one GEMM per gradient either way, and the shifted one skips im2col's copy and col2im's
  // scatter: FCN's score layers (21 outputs) 0.62-0.78x the time (score_fr 6.0 -> 3.8 ms, score_pool4 1.9 -> 1.3,
  // score_pool3 3.1 -> 2.4).
  if (g.r * g.s == 1) return true;
  // Larger kernels: r x s GEMMs reducing over C/G (forward, dgrad) or K/G x C/G tiles (wgrad) against im2col's one
  // deep GEMM. Since Winograd took the large 3 x 3 layers, the shifted ones won only from 256 channels on maps of
  // 1024 pixels (2-core Zen 5, fp32, forward, 1 x 256 x 33^2: 3.9 vs 4.7 ms) and lost below (32-128 channels at
  // 17^2-66^2: 1.1-3.6x im2col's time; 256 at 29^2: 3.9 vs 3.1). Their backward lost at 1 x 512 x 29^2 (40 vs 27
  // ms) and 1 x 256 x 33^2, tied at 44^2 and won at 500 x 500's 88^2 (conv4_2, 0.93-0.96x).
  if (backward) return g.c_g >= 256 && g.k_g >= 256 && g.oh * g.ow >= 2048;
  return g.c_g >= 256 && g.oh * g.ow >= 1024;
}

// Whether the wide grid has columns past each output row (any kernel wider than 1 or padding): their dy' is zero,
// and the shifted dW multiplies it by real x values, so an inf in x would make NaN of a dW PyTorch gives as +-inf
// (0 * inf; 20 of 170 positions tested). Such an x goes to im2col's GEMMs, whose products are exactly the conv's.
// The check is one pass over x where the shifted backward's GEMMs make ~2 x R x S x K/G passes.
bool wide_grid_reads_past_rows(const ConvGeometry& g) { return g.s > 1 || g.pad_w > 0; }

bool has_non_finite(const at::Tensor& x) { return !at::isfinite(x).all().item<bool>(); }

// The wide grid of the shifted GEMMs: the input padded to hp x wp (one spare row, so that the last block's taps
// stay inside), output pixel (oh, ow) at column oh * wp + ow, tap rs reading `offset(rs)` columns further on.
struct ShiftedGrid {
  int64_t wp, hp, wide, max_offset;
  const ConvGeometry& g;
  explicit ShiftedGrid(const ConvGeometry& geometry)
      : wp(geometry.w + 2 * geometry.pad_w), hp(geometry.h + 2 * geometry.pad_h + 1), wide(geometry.oh * wp),
        max_offset((geometry.r - 1) * geometry.dil_h * wp + (geometry.s - 1) * geometry.dil_w), g(geometry) {}
  int64_t offset(int64_t rs) const { return (rs / g.s) * g.dil_h * wp + (rs % g.s) * g.dil_w; }
  // Wide columns per GEMM block: the block's two operands (rows_a + rows_b) x block, fp32, at about the L2 budget.
  int64_t block(int64_t rows_a, int64_t rows_b) const {
    const int64_t fit = pixel_block_budget() / ((rows_a + rows_b) * 4);
    return std::min(std::clamp<int64_t>(fit / 16 * 16, 256, 8192), wide + max_offset);
  }
  // Whether x[n] already is its own padded copy: a 1 x 1 kernel without padding reads no column past the wide
  // grid's h * w (the spare row is for larger kernels' taps), so a contiguous x in the accumulation type serves as
  // it lies. The copy was 0.3-0.5 ms of score_fr's 1.4 ms forward + backward at a 500 x 500 input (eager: 0.8).
  template <typename scalar_t, typename acc_t>
  bool reads_x_as_is(const at::Tensor& x) const {
    return std::is_same_v<scalar_t, acc_t> && g.r * g.s == 1 && g.pad_h == 0 && g.pad_w == 0 && x.is_contiguous();
  }
  // x[n] (any strides, any float dtype) as a zero-padded acc_t copy, one flat row of hp * wp columns per channel.
  // Each element is written once (zeros, then a copy, was part of 11 ms of conv3_2's 120 ms forward). Plain
  // at::empty, not the large-block cache: the cache keeps one block per layer size, which raised the FCN-8s
  // training step's peak memory to 693 MB (535-626 MB without).
  template <typename scalar_t, typename acc_t>
  at::Tensor padded(const at::Tensor& x, int64_t n) const {
    if (reads_x_as_is<scalar_t, acc_t>(x)) return x[n].view({g.c, g.h * g.w});
    const int64_t row = hp * wp;
    at::Tensor xp = at::empty({g.c, row}, x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    const scalar_t* src = x.const_data_ptr<scalar_t>() + n * x.stride(0);
    const int64_t xs1 = x.stride(1), xs2 = x.stride(2), xs3 = x.stride(3);
    acc_t* dst = xp.mutable_data_ptr<acc_t>();
    at::parallel_for(0, g.c, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        acc_t* d = dst + c * row;
        std::fill(d, d + g.pad_h * wp + g.pad_w, acc_t(0));
        for (int64_t ih = 0; ih < g.h; ++ih) {
          acc_t* line = d + (g.pad_h + ih) * wp + g.pad_w;
          const scalar_t* s = src + c * xs1 + ih * xs2;
          for (int64_t iw = 0; iw < g.w; ++iw) line[iw] = static_cast<acc_t>(s[iw * xs3]);
          // the right padding of this row and the left padding of the next, which follow each other
          std::fill(line + g.w, line + g.w + 2 * g.pad_w, acc_t(0));
        }
        std::fill(d + (g.pad_h + g.h) * wp + g.pad_w, d + row, acc_t(0));
      }
    });
    return xp;
  }
  // The weight as groups x taps x K/G x C/G, one GEMM operand per (group, tap). A 1 x 1 kernel's weight is
  // already in that layout: viewed, not copied (fc7's is 64 MB; the copy made its forward 1.65x im2col's time).
  template <typename acc_t>
  at::Tensor taps(const at::Tensor& weight) const {
    const at::Tensor w = weight.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    if (g.r * g.s == 1) return w.view({g.groups, 1, g.k_g, g.c_g});
    return per_group_transpose<acc_t>(w, at::empty({g.groups, g.r * g.s, g.k_g, g.c_g}, w.options()), false);
  }
  // The inverse, for a weight gradient kept as groups x taps x K/G x C/G: K x C/G x R x S.
  template <typename acc_t>
  at::Tensor untaps(const at::Tensor& by_taps) const {
    const at::Tensor src = by_taps.contiguous();
    if (g.r * g.s == 1) return src.view({g.k, g.c_g, 1, 1});
    const at::Tensor dst = empty_large({g.k, g.c_g, g.r, g.s}, src.options(), at::MemoryFormat::Contiguous);
    return per_group_transpose<acc_t>(src, dst, true);
  }

 private:
  // Per group, (K/G * C/G) x taps <-> taps x (K/G * C/G); `from_taps` says which side src is.
  template <typename acc_t>
  at::Tensor per_group_transpose(const at::Tensor& src, at::Tensor out, bool from_taps) const {
    const int64_t taps = g.r * g.s, per_group = g.k_g * g.c_g;
    for (int64_t group = 0; group < g.groups; ++group) {
      transpose_into(src.const_data_ptr<acc_t>() + group * per_group * taps, from_taps ? taps : per_group,
                     from_taps ? per_group : taps, out.mutable_data_ptr<acc_t>() + group * per_group * taps);
    }
    return out;
  }
};

// The forward's epilogue: rows [0, rows) of a block of wide columns [q0, q0 + count) (row r at src + r * stride) are
// output channels k0 + r of image n; adds the bias, applies the ReLU and stores the columns with ow < OW.
template <typename scalar_t, typename acc_t>
void store_output(const acc_t* src, int64_t stride, int64_t rows, int64_t k0, int64_t n, int64_t q0, int64_t count,
                  const acc_t* bias, bool relu, const at::Tensor& y, const ConvGeometry& g, int64_t wp) {
  scalar_t* yp = y.mutable_data_ptr<scalar_t>();
  const int64_t ys[4] = {y.stride(0), y.stride(1), y.stride(2), y.stride(3)};
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t add = bias != nullptr ? bias[k0 + r] : acc_t(0);
    scalar_t* dst = yp + n * ys[0] + (k0 + r) * ys[1];
    for (int64_t q = 0; q < count;) {
      const int64_t p = q0 + q, oh = p / wp, ow0 = p % wp, len = std::min(wp - ow0, count - q);
      const acc_t* in = src + r * stride + q;
      scalar_t* row = dst + oh * ys[2];
      const int64_t stop = std::max<int64_t>(0, std::min(len, g.ow - ow0));
      if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
        if (ys[3] == 1) {
          bias_relu_row_f(in, add, relu, stop, row + ow0);
          q += len;
          continue;
        }
      }
      for (int64_t i = 0; i < stop; ++i) {
        const acc_t v = in[i] + add;
        row[(ow0 + i) * ys[3]] = static_cast<scalar_t>(relu ? std::max(v, acc_t(0)) : v);
      }
      q += len;
    }
  }
}

template <typename scalar_t, typename acc_t>
void forward_shifted(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                     const at::Tensor& y, const ConvGeometry& g, bool relu) {
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  const ShiftedGrid grid(g);
  const int64_t wp = grid.wp, wide = grid.wide, taps = g.r * g.s;
  std::vector<at::Tensor> xp(g.n);
  for (int64_t n = 0; n < g.n; ++n) xp[n] = grid.padded<scalar_t, acc_t>(x, n);
  at::Tensor bias_acc = bias.has_value() ? bias->to(acc).contiguous() : at::Tensor();
  const acc_t* bp = bias_acc.defined() ? bias_acc.const_data_ptr<acc_t>() : nullptr;

  const at::Tensor w_taps = grid.taps<acc_t>(weight);
  const EvenBlocks blocks(wide, grid.block(g.k_g, g.c_g), g.n * g.groups);
  const int64_t tasks = g.n * g.groups * blocks.count;
  const ThreadScratch scratch(spread_tasks(tasks), g.k_g * blocks.max_size(), x.options().dtype(acc));
  run_tasks(tasks, scratch.spread, [&](int64_t begin, int64_t end) {
    acc_t* const out = scratch.mine<acc_t>();
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task % blocks.count, group = (task / blocks.count) % g.groups;
      const int64_t n = task / (blocks.count * g.groups), q0 = blocks.begin(b), count = blocks.size(b);
      auto out_m = matrix(out, g.k_g, count, acc);
      const at::Tensor xg = xp[n].narrow(0, group * g.c_g, g.c_g);
      for (int64_t rs = 0; rs < taps; ++rs) {
        mm_into(out_m, w_taps[group][rs], xg.narrow(1, q0 + grid.offset(rs), count), rs == 0);
      }
      store_output<scalar_t, acc_t>(out, count, g.k_g, group * g.k_g, n, q0, count, bp, relu, y, g, wp);
    }
  });
}

// The stride-1 backward on the forward's wide grid, without im2col or col2im. dy' = dy * (y > 0) is laid out
// like the forward's output block (wp columns per row, zero past ow) with max_offset zero columns on each side,
// so both gradients are shifted GEMMs over plain strided views:
//   dW_rs += dy'[:, q block] @ Xp[:, q block + offset(rs)]^T        (per-thread accumulators, summed at the end)
//   dXp[:, p block] = sum_rs W_rs^T @ dy'[:, p block - offset(rs)]  (interior columns only: each dx element once)
// One image at a time, so the padded copies of x and dy' are one image's. dbias is summed while dy' is built,
// one channel per thread, so it does not depend on the thread count. Where it runs, see use_shifted.
template <typename scalar_t, typename acc_t>
void backward_shifted(const at::Tensor& grad, const at::Tensor& y, const at::Tensor& x, const at::Tensor& weight,
                      const ConvGeometry& g, bool relu, bool need_w, const at::Tensor& dx, at::Tensor& dw_acc,
                      const at::Tensor& db_acc) {
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  const ShiftedGrid grid(g);
  const int64_t wp = grid.wp, wide = grid.wide, margin = grid.max_offset, taps = g.r * g.s;
  const int64_t length = wide + 2 * margin;
  const bool need_x = dx.defined();
  // Transposed once: C x K per tap, the dx GEMMs' left operand.
  const at::Tensor w_taps_t =
      need_x ? gemm_left(grid.taps<acc_t>(weight).transpose(2, 3), g.n * g.oh * g.ow) : at::Tensor();
  const int64_t gs[4] = {grad.stride(0), grad.stride(1), grad.stride(2), grad.stride(3)};
  const int64_t ys[4] = {y.stride(0), y.stride(1), y.stride(2), y.stride(3)};
  const int64_t xs[4] = {need_x ? dx.stride(0) : 0, need_x ? dx.stride(1) : 0, need_x ? dx.stride(2) : 0,
                         need_x ? dx.stride(3) : 0};
  const scalar_t *gp = grad.const_data_ptr<scalar_t>(), *yp = y.const_data_ptr<scalar_t>();
  scalar_t* dxp = need_x ? dx.mutable_data_ptr<scalar_t>() : nullptr;
  acc_t* dbp = db_acc.defined() ? db_acc.mutable_data_ptr<acc_t>() : nullptr;
  at::Tensor dy_wide = at::empty({g.k, length}, grad.options().dtype(acc));
  acc_t* dyw = dy_wide.mutable_data_ptr<acc_t>();

  const EvenBlocks w_cut(wide, grid.block(g.k_g, g.c_g), g.groups);
  const int64_t interior = g.h * wp;  // dXp columns of the input's rows, from column pad_h * wp on
  const EvenBlocks x_cut(interior, grid.block(g.c_g, g.k_g), g.groups);
  // dx straight from one GEMM per group, where dx[n] is itself the wide grid (see reads_x_as_is): no block buffer
  // and no store pass.
  const bool dx_in_place = need_x && grid.reads_x_as_is<scalar_t, acc_t>(dx);
  const int64_t w_blocks = need_w ? w_cut.count : 0, x_blocks = need_x && !dx_in_place ? x_cut.count : 0;
  const int64_t tasks = g.groups * (w_blocks + x_blocks);
  const bool spread = spread_tasks(tasks);
  const int64_t threads = spread ? at::get_num_threads() : 1;
  std::optional<LazyParts> dw_parts;
  if (need_w) dw_parts.emplace(at::IntArrayRef{threads, g.groups, taps, g.k_g, g.c_g}, x.options().dtype(acc));
  const ThreadScratch scratch(spread, need_x ? g.c_g * x_cut.max_size() : 0, x.options().dtype(acc));

  // dXp's rows [0, rows) of wide columns [p0, p0 + count) (row r at src + r * stride) are channels c0 + r of dx[n]:
  // only the columns inside the input are stored, each dx element exactly once.
  const auto store_dx = [&](int64_t n, const acc_t* src, int64_t stride, int64_t rows, int64_t c0, int64_t p0,
                            int64_t count) {
    for (int64_t r = 0; r < rows; ++r) {
      scalar_t* dst = dxp + n * xs[0] + (c0 + r) * xs[1];
      for (int64_t q = 0; q < count;) {
        const int64_t p = p0 + q, ih = p / wp - g.pad_h, col = p % wp, len = std::min(wp - col, count - q);
        const int64_t a = std::clamp<int64_t>(g.pad_w - col, 0, len);
        const int64_t z = std::clamp<int64_t>(g.pad_w + g.w - col, a, len);
        const acc_t* in = src + r * stride + q;
        scalar_t* row = dst + ih * xs[2] + (col - g.pad_w) * xs[3];
        if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
          if (xs[3] == 1) {
            copy_row_f(in + a, z - a, row + a);
            q += len;
            continue;
          }
        }
        for (int64_t i = a; i < z; ++i) row[i * xs[3]] = static_cast<scalar_t>(in[i]);
        q += len;
      }
    }
  };
  for (int64_t n = 0; n < g.n; ++n) {
    at::parallel_for(0, g.k, 1, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        acc_t* row = dyw + k * length;
        std::fill(row, row + margin, acc_t(0));
        std::fill(row + margin + wide, row + length, acc_t(0));
        const scalar_t* gk = gp + n * gs[0] + k * gs[1];
        const scalar_t* yk = yp + n * ys[0] + k * ys[1];
        acc_t sum = 0;
        for (int64_t oh = 0; oh < g.oh; ++oh) {
          acc_t* d = row + margin + oh * wp;
          const scalar_t* gr = gk + oh * gs[2];
          const scalar_t* yr = yk + oh * ys[2];
          for (int64_t ow = 0; ow < g.ow; ++ow) {
            const acc_t v = static_cast<acc_t>(gr[ow * gs[3]]);
            d[ow] = (relu && static_cast<acc_t>(yr[ow * ys[3]]) <= acc_t(0)) ? acc_t(0) : v;
            sum += d[ow];
          }
          std::fill(d + g.ow, d + wp, acc_t(0));
        }
        if (dbp != nullptr) dbp[k] += sum;
      }
    });
    const at::Tensor xp = need_w ? grid.padded<scalar_t, acc_t>(x, n) : at::Tensor();
    if (dx_in_place) {
      const at::Tensor dx_n = dx[n].view({g.c, wide});
      for (int64_t group = 0; group < g.groups; ++group) {
        mm_into(dx_n.narrow(0, group * g.c_g, g.c_g), w_taps_t[group][0], dy_wide.narrow(0, group * g.k_g, g.k_g),
                true);
      }
    }
    run_tasks(tasks, spread, [&](int64_t begin, int64_t end) {
      const int64_t tid = spread ? at::get_thread_num() : 0;
      acc_t* const out = scratch.mine<acc_t>();
      for (int64_t task = begin; task < end; ++task) {
        const int64_t group = task % g.groups, b = task / g.groups;
        const at::Tensor dy_g = dy_wide.narrow(0, group * g.k_g, g.k_g);
        if (b < w_blocks) {
          const int64_t q0 = w_cut.begin(b), count = w_cut.size(b);
          const at::Tensor dy_m = dy_g.narrow(1, margin + q0, count);
          const at::Tensor xg = xp.narrow(0, group * g.c_g, g.c_g);
          dw_parts->accumulate(tid, group, [&](const at::Tensor& slot, bool overwrite) {
            for (int64_t rs = 0; rs < taps; ++rs) {
              mm_into(slot[rs], dy_m, xg.narrow(1, q0 + grid.offset(rs), count).t(), overwrite);
            }
          });
          continue;
        }
        const int64_t p0 = g.pad_h * wp + x_cut.begin(b - w_blocks), count = x_cut.size(b - w_blocks);
        auto out_m = matrix(out, g.c_g, count, acc);
        for (int64_t rs = 0; rs < taps; ++rs) {
          mm_into(out_m, w_taps_t[group][rs], dy_g.narrow(1, margin + p0 - grid.offset(rs), count), rs == 0);
        }
        store_dx(n, out, count, g.c_g, group * g.c_g, p0, count);
      }
    });
  }
  if (need_w) dw_acc = grid.untaps<acc_t>(dw_parts->total());
}

// Bands of whole output rows, tall enough that a band's input rows overlap only its neighbours' (see top).
int64_t backward_band_rows(const ConvGeometry& g) {
  const int64_t min_rows = ((g.r - 1) * g.dil_h + g.stride_h - 1) / g.stride_h + 1;
  return std::min(g.oh, std::max(min_rows, pixel_block(g, 4) / std::max<int64_t>(g.ow, 1)));
}

int64_t backward_bands(const ConvGeometry& g) {
  const int64_t rows = backward_band_rows(g);
  return (g.oh + rows - 1) / rows;
}

template <typename scalar_t, typename acc_t>
void backward_impl(const at::Tensor& grad, const at::Tensor& y, const at::Tensor& x, const at::Tensor& w_acc,
                   const ConvGeometry& g, bool relu, bool spread, const at::Tensor& dx_acc, LazyParts* dw_parts,
                   const at::Tensor& db_parts) {
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  const bool need_x = dx_acc.defined(), need_w = dw_parts != nullptr, need_b = db_parts.defined();
  const int64_t band_rows = backward_band_rows(g), bands = backward_bands(g);
  const scalar_t *gp = grad.const_data_ptr<scalar_t>(), *yp = y.const_data_ptr<scalar_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const int64_t xs[4] = {x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
  const int64_t gs[4] = {grad.stride(0), grad.stride(1), grad.stride(2), grad.stride(3)};
  const int64_t ys[4] = {y.stride(0), y.stride(1), y.stride(2), y.stride(3)};
  // groups x J x K_g, the dx GEMMs' left operand
  const at::Tensor w_t = need_x ? gemm_left(w_acc.transpose(1, 2), g.n * g.oh * g.ow) : at::Tensor();

  // Images write disjoint parts of dx, so one phase covers the bands of one parity in every image.
  const int64_t max_count = band_rows * g.ow;
  const ThreadScratch scratch(spread, (g.j + g.k_g) * max_count, x.options().dtype(acc));
  {
    for (int64_t parity = 0; parity < 2; ++parity) {
      const int64_t per_image = g.groups * ((bands - parity + 1) / 2);
      run_tasks(g.n * per_image, spread, [&](int64_t begin, int64_t end) {
        const int64_t tid = at::get_thread_num();
        acc_t* const cols = scratch.mine<acc_t>();
        acc_t* const dy = cols + g.j * max_count;
        for (int64_t task = begin; task < end; ++task) {
          const int64_t n = task / per_image, in_image = task % per_image;
          acc_t* dx_img = need_x ? dx_acc.mutable_data_ptr<acc_t>() + n * g.c * g.h * g.w : nullptr;
          const int64_t group = in_image % g.groups, band = 2 * (in_image / g.groups) + parity;
          const int64_t p0 = band * band_rows * g.ow;
          const int64_t count = std::min(band_rows, g.oh - band * band_rows) * g.ow;
          // The masked output gradient of this block, once, in acc_t.
          for_rows(g.k_g, count, [&](int64_t kk) {
            const int64_t k = group * g.k_g + kk;
            const scalar_t* gk = gp + n * gs[0] + k * gs[1];
            const scalar_t* yk = yp + n * ys[0] + k * ys[1];
            acc_t* dst = dy + kk * count;
            for_each_row_run(g, p0, count, [&](int64_t q, int64_t oh, int64_t ow0, int64_t len) {
              const scalar_t* gr = gk + oh * gs[2] + ow0 * gs[3];
              const scalar_t* yr = yk + oh * ys[2] + ow0 * ys[3];
              acc_t* d = dst + q;
              if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
                if (gs[3] == 1 && !relu) return copy_row_f(gr, len, d);
                if (gs[3] == 1 && ys[3] == 1) return masked_row_f(gr, yr, len, d);
              }
              for (int64_t i = 0; i < len; ++i) {
                const acc_t v = static_cast<acc_t>(gr[i * gs[3]]);
                d[i] = (relu && static_cast<acc_t>(yr[i * ys[3]]) <= acc_t(0)) ? acc_t(0) : v;
              }
            });
          });
          auto dy_m = matrix(dy, g.k_g, count, acc);
          if (need_b) db_parts[tid].narrow(0, group * g.k_g, g.k_g).add_(dy_m.sum(1));
          if (need_w) {
            im2col(xp, xs, g, n, group, p0, count, cols);
            dw_parts->accumulate(tid, group, [&](const at::Tensor& slot, bool overwrite) {
              mm_into(slot, dy_m, matrix(cols, g.j, count, acc).t(), overwrite);
            });
          }
          if (need_x) {
            auto dcols = matrix(cols, g.j, count, acc);
            mm_into(dcols, w_t[group], dy_m, true);
            col2im_add(cols, g, group, p0, count, dx_img);
          }
        }
      });
    }
  }
}

at::Tensor empty_like_format(const at::Tensor& like, at::IntArrayRef sizes, at::ScalarType dtype) {
  return at::empty(sizes, like.options().dtype(dtype).memory_format(like.suggest_memory_format()));
}

// The backward of a convolution that use_shifted() accepts: dx written directly in x's dtype and memory format.
std::tuple<at::Tensor, at::Tensor, at::Tensor> shifted_bwd(const at::Tensor& grad, const at::Tensor& y,
                                                           const at::Tensor& x, const at::Tensor& weight,
                                                           const ConvGeometry& g, bool relu,
                                                           std::array<bool, 3> output_mask) {
  const auto [need_x, need_w, need_b] = output_mask;
  const auto acc = acc_type_of(x);
  at::Tensor dx = need_x ? empty_like_format(x, x.sizes(), x.scalar_type()) : at::Tensor();
  if (need_x) maybe_poison(dx);
  at::Tensor db_acc = need_b ? at::zeros({g.k}, x.options().dtype(acc)) : at::Tensor();
  at::Tensor dw_acc;  // K x C/G x R x S in the accumulation type
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv2d_relu_bwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    backward_shifted<scalar_t, acc_t>(grad, y, x, weight, g, relu, need_w, dx, dw_acc, db_acc);
  });
  const at::Tensor none = at::empty({0}, x.options());
  return {need_x ? dx : none,
          need_w ? dw_acc.to(weight.scalar_type()) : none,
          need_b ? db_acc.to(x.scalar_type()) : none};
}

bool columns_are_x(const ConvGeometry& g) {
  return g.r * g.s == 1 && g.stride_h == 1 && g.stride_w == 1 && g.pad_h == 0 && g.pad_w == 0;
}

// Small maps of a batch (fc6, fc7 and the score layers of a small input) as one GEMM per group whose columns are
// every image's pixels. The direct kernels cut their GEMMs per image, so batch 8 of fc7 at 1/8 width (512 -> 512
// over 3 x 3) was 8 GEMMs 9 columns wide, each streaming the whole weight (fwd 0.34 vs eager's 0.17 ms, fwd + bwd
// 1.60 vs 0.65), and fc6's (64 -> 512, 7 x 7 to 3 x 3) 8 GEMMs 3136 deep and 9 wide. The columns are ATen's im2col
// of the batch (C.R.S x N.OH.OW; for a 1 x 1 stride-1 unpadded kernel x itself, permuted), dx goes back through
// ATen's col2im, the GEMMs are the direct kernels' library. Layers the register-blocked or Winograd kernels take
// keep them. Where (2-core Zen 5, fp32, batch 8, time vs the per-image path): a 1 x 1 kernel under 256 pixels (81:
// fwd 0.77x, bwd 0.48x; 225: 1.0x, 0.61x), others up to 64 pixels (fc6 from 4096 x 9 x 9: 0.47x, 0.40x; 512 ch 3 x 3
// on 7 x 7: 0.92x, 0.63x) but not at 81 (512 ch 3 x 3 on 9 x 9: 1.37x, 1.18x: ATen's im2col and col2im copies).
// FCNKERN_CONV_BATCHED: "0" never, "all" every geometry whatever its size (the tests reach it so).
bool use_batched(const ConvGeometry& g) {
  const std::string_view mode = env_setting("FCNKERN_CONV_BATCHED");
  if (mode == "0") return false;
  if (mode == "all") return true;
  const int64_t column_floats = g.n * g.oh * g.ow * g.c * g.r * g.s;
  const int64_t max_pixels = columns_are_x(g) ? 255 : 64;
  return g.n > 1 && g.oh * g.ow <= max_pixels && column_floats <= (int64_t{16} << 20);
}

// t (N x C x H x W, any layout) as G x C/G x N.H.W: every image's pixels as the columns of each channel's row.
at::Tensor batch_pixels(const at::Tensor& t, int64_t groups) {
  return t.permute({1, 0, 2, 3}).reshape({groups, t.size(1) / groups, -1});
}

// The batch's im2col columns, G x C/G.R.S x N.OH.OW in the accumulation type (x any layout).
at::Tensor batch_columns(const at::Tensor& x, const ConvGeometry& g, at::ScalarType acc) {
  const at::Tensor xa = x.to(acc);
  if (columns_are_x(g)) return batch_pixels(xa, g.groups);
  const at::Tensor cols = at::im2col(xa, {g.r, g.s}, {g.dil_h, g.dil_w}, {g.pad_h, g.pad_w}, {g.stride_h, g.stride_w});
  return cols.permute({1, 0, 2}).reshape({g.groups, g.j, -1});
}

// a[grp] @ b[grp] for every group, in fp32, through the GEMM library of the direct kernels (oneDNN's ran fc7's
// 512 x 512 x 72 product in about half at::bmm's time here), or for bf16 a and b on the dot-product kernels
// (gemm_bf16: the products exact, twice the FMA rate).
at::Tensor grouped_mm(const at::Tensor& a, const at::Tensor& b) {
  const auto options = a.options().dtype(a.scalar_type() == at::kBFloat16 ? at::kFloat : a.scalar_type());
  at::Tensor out = empty_large({a.size(0), a.size(1), b.size(2)}, options, at::MemoryFormat::Contiguous);
  for (int64_t grp = 0; grp < a.size(0); ++grp) {
    if (a.scalar_type() == at::kBFloat16) {
      gemm_bf16(out[grp], pack_bf16_left(a[grp]), pack_bf16_right(b[grp]), a.size(2), true);
    } else {
      mm_into(out[grp], a[grp], b[grp], true);
    }
  }
  return out;
}

// m (G x K/G x N.OH.OW) stored into out (N x K x OH x OW, any layout and dtype): batch_pixels' inverse.
void store_batch_pixels(const at::Tensor& m, const at::Tensor& out) {
  out.copy_(m.view({out.size(1), out.size(0), out.size(2), out.size(3)}).permute({1, 0, 2, 3}));
}

void batched_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                     const at::Tensor& y, const ConvGeometry& g, bool relu) {
  // bf16 operands where the dot-product kernels take them (grouped_mm then runs gemm_bf16), else fp32 / fp64.
  const auto acc = acc_type_of(x);
  const auto operands = bf16_dot_products({x.scalar_type(), weight.scalar_type()}) ? at::kBFloat16 : acc;
  const at::Tensor w = weight.to(operands).reshape({g.groups, g.k_g, g.j});
  at::Tensor out = grouped_mm(w, batch_columns(x, g, operands));
  if (bias.has_value()) out.add_(bias->to(acc).view({g.groups, g.k_g, 1}));
  if (relu) out.relu_();
  store_batch_pixels(out, y);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batched_bwd(const at::Tensor& grad, const at::Tensor& y,
                                                           const at::Tensor& x, const at::Tensor& weight,
                                                           const ConvGeometry& g, bool relu,
                                                           std::array<bool, 3> output_mask) {
  const auto [need_x, need_w, need_b] = output_mask;
  const auto acc = acc_type_of(x);
  const auto operands =
      bf16_dot_products({grad.scalar_type(), x.scalar_type(), weight.scalar_type()}) ? at::kBFloat16 : acc;
  // threshold_backward is PyTorch's ReLU mask itself: no gradient where y <= 0, a NaN output passes it.
  const at::Tensor dy = batch_pixels((relu ? at::threshold_backward(grad, y, 0) : grad).to(operands), g.groups);
  const at::Tensor none = at::empty({0}, x.options());
  at::Tensor dx = none, dw = none, db = none;
  if (need_x) {
    const at::Tensor w = weight.to(operands).reshape({g.groups, g.k_g, g.j});
    const at::Tensor cols = grouped_mm(w.transpose(1, 2), dy);  // G x C/G.R.S x N.OH.OW, fp32
    dx = empty_like_format(x, x.sizes(), x.scalar_type());
    if (columns_are_x(g)) {
      store_batch_pixels(cols, dx);
    } else {
      const at::Tensor per_image = cols.view({g.c * g.r * g.s, g.n, g.oh * g.ow}).permute({1, 0, 2});
      dx.copy_(at::col2im(per_image.contiguous(), {g.h, g.w}, {g.r, g.s}, {g.dil_h, g.dil_w}, {g.pad_h, g.pad_w},
                          {g.stride_h, g.stride_w}));
    }
  }
  if (need_w) {
    dw = grouped_mm(dy, batch_columns(x, g, operands).transpose(1, 2)).reshape(weight.sizes()).to(weight.scalar_type());
  }
  if (need_b) db = dy.sum(2, false, acc).reshape({g.k}).to(x.scalar_type());
  return {dx, dw, db};
}

// Whether a pass goes to Winograd: where use_winograd says so, except bf16 layers that the register-blocked kernels
// take on AVX512-BF16 dot products (64 -> 64 channels, VGG's conv1_2 at full width), twice the fp32 rate that
// Winograd's fp32 GEMMs run at: 1 x 64 x 200^2 bf16, forward 13.7 -> 7.8 ms, backward 31.4 -> 22.1 (eager bf16:
// 7.5 and 17.4). FCNKERN_CONV_WINOGRAD=all still forces Winograd.
bool winograd_first(const ConvGeometry& g, WinogradPass pass, BlockedPass blocked_pass, const at::Tensor& x,
                    const at::Tensor& weight) {
  if (!use_winograd(g, pass)) return false;
  const bool dot = bf16_dot_products({x.scalar_type(), weight.scalar_type()}) && use_blocked(g, blocked_pass);
  return !dot || env_setting("FCNKERN_CONV_WINOGRAD") == "all";
}

}  // namespace

at::Tensor conv2d_relu_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                           int64_t groups, bool relu) {
  // The GEMMs below are ATen calls on the (possibly grad-requiring) inputs; this op's autograd is its own.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const ConvGeometry g = make_geometry(x, weight, stride, padding, dilation, groups);
  check_args(x, weight, g);
  check_bias(bias, x, g);
  at::Tensor y = empty_like_format(x, {g.n, g.k, g.oh, g.ow}, x.scalar_type());
  maybe_poison(y);
  if (y.numel() == 0) return y;
  if (winograd_first(g, WinogradPass::kForward, BlockedPass::kForward, x, weight) &&
      winograd_forward(x, weight, bias, y, g, relu)) {
    return y;
  }
  if (x.scalar_type() != at::kDouble && use_blocked(g, BlockedPass::kForward)) {
    blocked_forward(x, weight, bias, y, g, relu);
    return y;
  }
  if (use_batched(g)) {
    batched_forward(x, weight, bias, y, g, relu);
    return y;
  }
  const auto acc = acc_type_of(x);
  const at::Tensor w_acc =
      use_shifted(g, false) ? at::Tensor() : weight.to(acc).reshape({g.groups, g.k_g, g.j}).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv2d_relu_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    if (use_shifted(g, false)) {
      forward_shifted<scalar_t, acc_t>(x, weight, bias, y, g, relu);
    } else {
      forward_impl<scalar_t, acc_t>(x, w_acc, bias, y, g, relu);
    }
  });
  return y;
}

// The direct kernels' backward (shifted GEMMs, or im2col + GEMMs + col2im) for the gradients output_mask asks for;
// a zero-size tensor for the others.
std::tuple<at::Tensor, at::Tensor, at::Tensor> direct_bwd(const at::Tensor& grad, const at::Tensor& y,
                                                          const at::Tensor& x, const at::Tensor& weight,
                                                          const ConvGeometry& g, bool relu,
                                                          std::array<bool, 3> output_mask) {
  const auto [need_x, need_w, need_b] = output_mask;
  const auto acc = acc_type_of(x);
  if (use_batched(g) && y.numel() > 0) return batched_bwd(grad, y, x, weight, g, relu, output_mask);
  if (use_shifted(g, true) && y.numel() > 0 && !(need_w && wide_grid_reads_past_rows(g) && has_non_finite(x))) {
    return shifted_bwd(grad, y, x, weight, g, relu, output_mask);
  }
  // Spread (group, band) tasks across threads only if every parity phase has enough of them; then each thread
  // needs its own weight-gradient accumulator.
  const bool spread = spread_tasks(g.n * g.groups * (backward_bands(g) / 2));
  const int threads = spread ? at::get_num_threads() : 1;
  at::Tensor dx_acc = need_x ? at::zeros({g.n, g.c, g.h, g.w}, x.options().dtype(acc)) : at::Tensor();
  std::optional<LazyParts> dw_parts;
  if (need_w) dw_parts.emplace(at::IntArrayRef{threads, g.groups, g.k_g, g.j}, x.options().dtype(acc));
  at::Tensor db_parts = need_b ? at::zeros({threads, g.k}, x.options().dtype(acc)) : at::Tensor();
  if (y.numel() > 0 && (need_x || need_w || need_b)) {
    const at::Tensor w_acc = weight.to(acc).reshape({g.groups, g.k_g, g.j}).contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv2d_relu_bwd_cpu", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      backward_impl<scalar_t, acc_t>(grad, y, x, w_acc, g, relu, spread, dx_acc, dw_parts ? &*dw_parts : nullptr,
                                     db_parts);
    });
  }
  at::Tensor dx = at::empty({0}, x.options()), dw = at::empty({0}, x.options()), db = at::empty({0}, x.options());
  if (need_x && x.scalar_type() == acc && x.suggest_memory_format() == at::MemoryFormat::Contiguous) {
    dx = dx_acc;  // already the gradient's dtype and layout: no copy (it was 73 ms of an FCN-8s step's 3.1 s)
  } else if (need_x) {
    dx = empty_like_format(x, x.sizes(), x.scalar_type());
    dx.copy_(dx_acc);
  }
  // One accumulator (fc6's is 400 MB) is the gradient itself: no summing pass.
  if (need_w) dw = dw_parts->total().reshape(weight.sizes()).to(weight.scalar_type());
  if (need_b) db = (threads == 1 ? db_parts[0] : db_parts.sum(0)).to(x.scalar_type());
  return {dx, dw, db};
}

// Gradients for x, weight and bias where output_mask says so; a zero-size tensor where it does not. Winograd
// (conv_relu_winograd_cpu.cpp) computes dx and dW + db where it applies; what it declines (non-finite inputs) and
// every other geometry goes to the direct kernels.
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_relu_bwd_cpu(const at::Tensor& grad, const at::Tensor& y,
                                                                   const at::Tensor& x, const at::Tensor& weight,
                                                                   at::IntArrayRef stride, at::IntArrayRef padding,
                                                                   at::IntArrayRef dilation, int64_t groups,
                                                                   bool relu, std::array<bool, 3> output_mask) {
  // The GEMMs below are ATen calls on the (possibly grad-requiring) inputs; this op's autograd is its own.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const ConvGeometry g = make_geometry(x, weight, stride, padding, dilation, groups);
  check_args(x, weight, g);
  check_bwd_args(grad, y, x, g);
  const auto [need_x, need_w, need_b] = output_mask;
  const bool winograd_x = need_x && winograd_first(g, WinogradPass::kDgrad, BlockedPass::kDgrad, x, weight);
  const bool blocked_x =
      need_x && !winograd_x && x.scalar_type() != at::kDouble && use_blocked(g, BlockedPass::kDgrad);
  const bool winograd_w =
      (need_w || need_b) && winograd_first(g, WinogradPass::kWgrad, BlockedPass::kWgrad, x, weight);
  const bool blocked_w = (need_w || need_b) && !winograd_w && x.scalar_type() != at::kDouble &&
                         use_blocked(g, BlockedPass::kWgrad);
  if (y.numel() == 0 || !(winograd_x || blocked_x || winograd_w || blocked_w)) {
    return direct_bwd(grad, y, x, weight, g, relu, output_mask);
  }
  at::Tensor dx, dw, db;
  if (winograd_x || blocked_x) {
    dx = empty_like_format(x, x.sizes(), x.scalar_type());
    maybe_poison(dx);
  }
  if (winograd_x && !winograd_dgrad(grad, y, weight, dx, g, relu)) dx = at::Tensor();
  if (blocked_x) blocked_dgrad(grad, y, weight, dx, g, relu);
  if ((winograd_w && winograd_wgrad(grad, y, x, g, relu, need_w, need_b, dw, db)) ||
      (blocked_w && blocked_wgrad(grad, y, x, g, relu, need_w, need_b, dw, db))) {
    if (need_w) dw = dw.to(weight.scalar_type());
    if (need_b) db = db.to(x.scalar_type());
  }
  const std::array<bool, 3> left = {need_x && !dx.defined(), need_w && !dw.defined(), need_b && !db.defined()};
  if (left[0] || left[1] || left[2]) {
    auto [rx, rw, rb] = direct_bwd(grad, y, x, weight, g, relu, left);
    if (left[0]) dx = rx;
    if (left[1]) dw = rw;
    if (left[2]) db = rb;
  }
  const at::Tensor none = at::empty({0}, x.options());
  return {need_x ? dx : none, need_w ? dw : none, need_b ? db : none};
}

TORCH_LIBRARY_IMPL(fcnkern, CPU, m) {
  m.impl("conv2d_relu", &conv2d_relu_cpu);
  m.impl("conv2d_relu_bwd", &conv2d_relu_bwd_cpu);
}

}  // namespace fcnkern
