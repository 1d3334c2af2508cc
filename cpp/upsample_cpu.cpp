// CPU kernels of fixed bilinear upsampling with the crop folded in (fcnkern.bilinear_upsample_crop).
//
// Upsampling by f with the 2f x 2f bilinear kernel is separable, and along each axis every output sample has
// exactly two input taps: for full-output coordinate Y, rows i1 = floor(Y / f) with weight k(Y - i1 f) and
// i0 = i1 - 1 with weight k(Y - i0 f), where k(t) = 1 - |t - (f - 1/2)| / f. Taps outside the input have weight 0.
// Tap tables are built once for the kept window only, so the crop costs nothing and nothing outside it is
// computed. The backward is the transpose of the same tables: each thread owns whole (n, c) planes and accumulates
// rows then columns in order, so it is race-free and deterministic.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "common.h"
#include "large_block_cache.h"
#include "upsample.h"

namespace fcnkern {
namespace {

struct Taps {
  std::vector<int64_t> idx0, idx1;  // input index of each output sample's two taps (clamped into range)
  std::vector<double> w0, w1;       // their weights (0 where the tap falls outside the input)
};

Taps make_taps(int64_t factor, int64_t start, int64_t count, int64_t in_len) {
  Taps t;
  t.idx0.resize(count), t.idx1.resize(count), t.w0.resize(count), t.w1.resize(count);
  const double center = factor - 0.5;
  for (int64_t o = 0; o < count; ++o) {
    const int64_t full = start + o;
    const int64_t i1 = full / factor, i0 = i1 - 1;
    const double k1 = 1.0 - std::abs(double(full - i1 * factor) - center) / factor;
    const double k0 = 1.0 - std::abs(double(full - i0 * factor) - center) / factor;
    const bool ok1 = i1 >= 0 && i1 < in_len, ok0 = i0 >= 0 && i0 < in_len;
    t.idx1[o] = ok1 ? i1 : 0, t.w1[o] = ok1 ? k1 : 0.0;
    t.idx0[o] = ok0 ? i0 : 0, t.w0[o] = ok0 ? k0 : 0.0;
  }
  return t;
}

}  // namespace

void check_bilinear_args(const at::Tensor& x, int64_t factor, int64_t top, int64_t left, int64_t out_h,
                         int64_t out_w) {
  TORCH_CHECK_VALUE(x.dim() == 4, "x must be N x C x h x w");
  TORCH_CHECK_VALUE(factor >= 1, "factor must be >= 1");
  TORCH_CHECK_VALUE(top >= 0 && left >= 0 && out_h >= 1 && out_w >= 1, "bad crop window");
  TORCH_CHECK_VALUE(top + out_h <= (x.size(2) - 1) * factor + 2 * factor &&
                        left + out_w <= (x.size(3) - 1) * factor + 2 * factor,
                    "crop window outside the upsampled output");
}

at::Tensor bilinear_upsample_crop_cpu(const at::Tensor& x, int64_t factor, int64_t top, int64_t left, int64_t out_h,
                                      int64_t out_w) {
  check_bilinear_args(x, factor, top, left, out_h, out_w);
  const int64_t N = x.size(0), C = x.size(1), h = x.size(2), w = x.size(3);
  at::Tensor out = empty_large({N, C, out_h, out_w}, x.options(), x.suggest_memory_format());
  maybe_poison(out);
  if (out.numel() == 0) return out;
  const Taps rows = make_taps(factor, top, out_h, h), cols = make_taps(factor, left, out_w, w);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bilinear_upsample_crop_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* in = x.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const int64_t xs[4] = {x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
    const int64_t os[4] = {out.stride(0), out.stride(1), out.stride(2), out.stride(3)};
    std::vector<acc_t> cw0(cols.w0.begin(), cols.w0.end()), cw1(cols.w1.begin(), cols.w1.end());
    at::parallel_for(0, N * C * out_h, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t y = r % out_h, c = (r / out_h) % C, n = r / (out_h * C);
        const scalar_t* plane = in + n * xs[0] + c * xs[1];
        const scalar_t* row0 = plane + rows.idx0[y] * xs[2];
        const scalar_t* row1 = plane + rows.idx1[y] * xs[2];
        const acc_t rw0 = static_cast<acc_t>(rows.w0[y]), rw1 = static_cast<acc_t>(rows.w1[y]);
        scalar_t* dst = o + n * os[0] + c * os[1] + y * os[2];
        for (int64_t xo = 0; xo < out_w; ++xo) {
          const int64_t j0 = cols.idx0[xo] * xs[3], j1 = cols.idx1[xo] * xs[3];
          const acc_t top_row = cw0[xo] * static_cast<acc_t>(row0[j0]) + cw1[xo] * static_cast<acc_t>(row0[j1]);
          const acc_t bottom_row = cw0[xo] * static_cast<acc_t>(row1[j0]) + cw1[xo] * static_cast<acc_t>(row1[j1]);
          dst[xo * os[3]] = static_cast<scalar_t>(rw0 * top_row + rw1 * bottom_row);
        }
      }
    });
  });
  return out;
}

at::Tensor bilinear_upsample_crop_bwd_cpu(const at::Tensor& grad, int64_t factor, int64_t top, int64_t left,
                                          int64_t in_h, int64_t in_w) {
  TORCH_CHECK_VALUE(grad.dim() == 4, "grad must be N x C x H x W");
  const int64_t N = grad.size(0), C = grad.size(1), out_h = grad.size(2), out_w = grad.size(3);
  at::Tensor gx = empty_large({N, C, in_h, in_w}, grad.options(), grad.suggest_memory_format());
  maybe_poison(gx);
  if (gx.numel() == 0) return gx;
  const Taps rows = make_taps(factor, top, out_h, in_h), cols = make_taps(factor, left, out_w, in_w);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "bilinear_upsample_crop_bwd", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* g = grad.data_ptr<scalar_t>();
    scalar_t* o = gx.data_ptr<scalar_t>();
    const int64_t gs[4] = {grad.stride(0), grad.stride(1), grad.stride(2), grad.stride(3)};
    const int64_t os[4] = {gx.stride(0), gx.stride(1), gx.stride(2), gx.stride(3)};
    at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> by_col(out_h * in_w), acc(in_h * in_w);
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t c = plane % C, n = plane / C;
        const scalar_t* gp = g + n * gs[0] + c * gs[1];
        // Columns: each output row's gradient goes to its two input columns.
        std::fill(by_col.begin(), by_col.end(), acc_t(0));
        for (int64_t y = 0; y < out_h; ++y) {
          acc_t* dst = by_col.data() + y * in_w;
          for (int64_t xo = 0; xo < out_w; ++xo) {
            const acc_t v = static_cast<acc_t>(gp[y * gs[2] + xo * gs[3]]);
            dst[cols.idx0[xo]] += static_cast<acc_t>(cols.w0[xo]) * v;
            dst[cols.idx1[xo]] += static_cast<acc_t>(cols.w1[xo]) * v;
          }
        }
        // Rows: each output row's column sums go to its two input rows.
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t y = 0; y < out_h; ++y) {
          const acc_t* src = by_col.data() + y * in_w;
          acc_t* r0 = acc.data() + rows.idx0[y] * in_w;
          acc_t* r1 = acc.data() + rows.idx1[y] * in_w;
          const acc_t w0 = static_cast<acc_t>(rows.w0[y]), w1 = static_cast<acc_t>(rows.w1[y]);
          for (int64_t j = 0; j < in_w; ++j) {
            r0[j] += w0 * src[j];
            r1[j] += w1 * src[j];
          }
        }
        scalar_t* op = o + n * os[0] + c * os[1];
        for (int64_t i = 0; i < in_h; ++i) {
          for (int64_t j = 0; j < in_w; ++j) op[i * os[2] + j * os[3]] = static_cast<scalar_t>(acc[i * in_w + j]);
        }
      }
    });
  });
  return gx;
}

}  // namespace fcnkern

TORCH_LIBRARY_IMPL(fcnkern, CPU, m) {
  m.impl("bilinear_upsample_crop", &fcnkern::bilinear_upsample_crop_cpu);
  m.impl("bilinear_upsample_crop_bwd", &fcnkern::bilinear_upsample_crop_bwd_cpu);
}
