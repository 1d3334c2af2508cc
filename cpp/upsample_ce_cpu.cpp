// CPU kernels of the fused FCN head (bilinear upsampling + crop + softmax cross-entropy; see upsample_ce.h).
//
// One task per cell. A cell's kept pixels are taken kTile at a time into the same C x kTile tile the plain loss
// uses (cross_entropy_tile.h): logits built from the cell's 2 x 2 x C scores with four multiply-adds each, softmax
// statistics and loss, then, when a gradient is wanted, the logit gradient in place and its four weighted sums over
// the tile's lanes into the cell's partials. The tile never leaves L1, and the loss gradient is computed in the same
// sweep as the loss: on a CPU the exp sweep sets the speed, so a second one in the backward would double the cost.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "common.h"
#include "cpu_math.h"
#include "cross_entropy_tile.h"
#include "upsample_ce.h"

namespace fcnkern {

HeadGeometry make_head_geometry(const at::Tensor& scores, const at::Tensor& target,
                                const std::optional<at::Tensor>& weight, int64_t factor, int64_t top, int64_t left) {
  TORCH_CHECK_VALUE(scores.dim() == 4, "scores must be N x C x h x w, got ", scores.dim(), " dimensions");
  TORCH_CHECK_VALUE(target.dim() == 3, "target must be N x H x W, got ", target.dim(), " dimensions");
  TORCH_CHECK_TYPE(scores.scalar_type() == at::kFloat || scores.scalar_type() == at::kHalf ||
                       scores.scalar_type() == at::kBFloat16 || scores.scalar_type() == at::kDouble,
                   "scores must be float32, float16, bfloat16 or float64, got ", scores.scalar_type());
  TORCH_CHECK_TYPE(target.scalar_type() == at::kLong, "target must be int64, got ", target.scalar_type());
  TORCH_CHECK_VALUE(target.device() == scores.device(), "target is on ", target.device(), " but scores on ",
                    scores.device());
  TORCH_CHECK_VALUE(target.size(0) == scores.size(0), "target has ", target.size(0), " images, scores ",
                    scores.size(0));
  HeadGeometry g{};
  g.n = scores.size(0), g.c = scores.size(1), g.h = scores.size(2), g.w = scores.size(3);
  g.H = target.size(1), g.W = target.size(2), g.f = factor, g.top = top, g.left = left;
  TORCH_CHECK_VALUE(g.c > 0 && g.h > 0 && g.w > 0, "scores need C, h, w >= 1, got ", scores.sizes());
  TORCH_CHECK_VALUE(factor >= 1, "factor must be >= 1, got ", factor);
  TORCH_CHECK_VALUE(top >= 0 && left >= 0 && g.H >= 1 && g.W >= 1, "bad crop window at (", top, ", ", left,
                    ") of size ", g.H, " x ", g.W);
  TORCH_CHECK_VALUE(top + g.H <= (g.h + 1) * factor && left + g.W <= (g.w + 1) * factor, "crop window (", top,
                    ", ", left, ") + ", g.H, " x ", g.W, " lies outside the upsampled output of ", (g.h + 1) * factor,
                    " x ", (g.w + 1) * factor);
  if (weight.has_value()) {
    TORCH_CHECK_VALUE(weight->dim() == 1 && weight->size(0) == g.c, "weight must be a vector of ", g.c,
                      " class weights, got shape ", weight->sizes());
    TORCH_CHECK_VALUE(weight->device() == scores.device(), "weight is on ", weight->device(), " but scores on ",
                      scores.device());
    TORCH_CHECK_TYPE(weight->scalar_type() == acc_type_of(scores), "weight must be ", acc_type_of(scores),
                     " (the computation dtype), got ", weight->scalar_type());
    TORCH_CHECK_VALUE(weight->is_contiguous(), "weight must be contiguous");
  }
  g.r0 = top / factor, g.q0 = left / factor;
  g.cr = (top + g.H - 1) / factor - g.r0 + 1;
  g.cq = (left + g.W - 1) / factor - g.q0 + 1;
  return g;
}

void check_head_grad_loss(const at::Tensor& grad_loss, const at::Tensor& scores, const HeadGeometry& g) {
  const auto acc = acc_type_of(scores);
  TORCH_CHECK_VALUE(grad_loss.dim() == 3 && grad_loss.size(0) == g.n && grad_loss.size(1) == g.H &&
                        grad_loss.size(2) == g.W && grad_loss.scalar_type() == acc &&
                        grad_loss.device() == scores.device(),
                    "grad_loss must be a ", acc, " N x H x W tensor on the scores' device (strides may be 0)");
}

at::Tensor combine_cell_grad_cpu(const at::Tensor& cells, const HeadGeometry& g) {
  at::Tensor grad = at::empty({g.n, g.c, g.h, g.w}, cells.options());
  AT_DISPATCH_FLOATING_TYPES(cells.scalar_type(), "combine_cell_grad_cpu", [&] {
    const scalar_t* src = cells.data_ptr<scalar_t>();
    scalar_t* out = grad.data_ptr<scalar_t>();
    // A task per ~16K gradient elements: one C++ loop instead of a zero fill and four strided adds (measured ~10 us
    // of ATen calls per backward on a tiny input).
    at::parallel_for(0, g.n * g.c * g.h, std::max<int64_t>(1, 16384 / g.w), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t i = row % g.h, c = (row / g.h) % g.c, n = row / (g.h * g.c);
        for (int64_t j = 0; j < g.w; ++j) out[row * g.w + j] = combine_one(src, g, n, c, i, j);
      }
    });
  });
  return grad;
}

namespace {

using namespace ce_tile;

// One tile of a cell: lanes are kept pixels, wts holds their four tap weights (4 x kTile, 0 on padding lanes),
// taps the cell's scores (4 x C). Writes each lane's loss; with partial, also adds the four weighted lane sums of
// the logit gradient (times upstream[j] when given, else for an upstream gradient of 1). Returns nonzero if a lane
// had a bad label.
template <typename acc_t, typename Math>
inline __attribute__((always_inline)) int32_t head_tile_math(acc_t* buf, int64_t C, const acc_t* taps,
                                                               const acc_t* wts, const int64_t* labels,
                                                               int64_t ignore_index, const acc_t* weight,
                                                               const acc_t* upstream, acc_t* loss, acc_t* partial) {
  const acc_t *w00 = wts, *w01 = wts + kTile, *w10 = wts + 2 * kTile, *w11 = wts + 3 * kTile;
  for (int64_t c = 0; c < C; ++c) {
    acc_t* row = buf + c * kTile;
    const acc_t s00 = taps[c], s01 = taps[C + c], s10 = taps[2 * C + c], s11 = taps[3 * C + c];
#pragma omp simd
    for (int64_t j = 0; j < kTile; ++j) row[j] = w00[j] * s00 + w01[j] * s01 + w10[j] * s10 + w11[j] * s11;
  }
  acc_t mx[kTile], lsum[kTile];
  const int32_t bad =
      fwd_tile_dispatch<acc_t, Math>(buf, C, labels, ignore_index, weight, mx, lsum, loss, partial != nullptr);
  if (partial == nullptr) return bad;
  if (weight != nullptr) {
    grad_from_exp_math<acc_t, Math, true>(buf, C, labels, ignore_index, weight, lsum);
  } else {
    grad_from_exp_math<acc_t, Math, false>(buf, C, labels, ignore_index, weight, lsum);
  }
  for (int64_t c = 0; c < C; ++c) {
    const acc_t* row = buf + c * kTile;
    acc_t p00 = 0, p01 = 0, p10 = 0, p11 = 0;
    if (upstream != nullptr) {
#pragma omp simd reduction(+ : p00, p01, p10, p11)
      for (int64_t j = 0; j < kTile; ++j) {
        const acc_t d = row[j] * upstream[j];
        p00 += w00[j] * d, p01 += w01[j] * d, p10 += w10[j] * d, p11 += w11[j] * d;
      }
    } else {
#pragma omp simd reduction(+ : p00, p01, p10, p11)
      for (int64_t j = 0; j < kTile; ++j) {
        const acc_t d = row[j];
        p00 += w00[j] * d, p01 += w01[j] * d, p10 += w10[j] * d, p11 += w11[j] * d;
      }
    }
    partial[c] += p00, partial[C + c] += p01, partial[2 * C + c] += p10, partial[3 * C + c] += p11;
  }
  return bad;
}

FCNK_MULTIVERSION int32_t head_tile(float* buf, int64_t C, const float* taps, const float* wts,
                                    const int64_t* labels, int64_t ignore_index, const float* weight,
                                    const float* upstream, float* loss, float* partial) {
  return head_tile_math<float, FloatMath>(buf, C, taps, wts, labels, ignore_index, weight, upstream, loss, partial);
}
int32_t head_tile(double* buf, int64_t C, const double* taps, const double* wts, const int64_t* labels,
                  int64_t ignore_index, const double* weight, const double* upstream, double* loss,
                  double* partial) {
  return head_tile_math<double, DoubleMath>(buf, C, taps, wts, labels, ignore_index, weight, upstream, loss,
                                            partial);
}

// The two bilinear tap weights of every offset 0..f-1 inside a cell, for tap 0 (index r - 1) and tap 1 (index r).
std::vector<double> cell_weights(int64_t f) {
  std::vector<double> wts(2 * f);
  for (int64_t u = 0; u < f; ++u) {
    wts[f + u] = (u + 0.5) / f;
    wts[u] = 1.0 - wts[f + u];
  }
  return wts;
}

// Runs every cell. loss (N x H x W, contiguous) is written when defined; cells (4 x N x C x CR x CQ) receives the
// partials when defined; grad_loss (N x H x W, any strides) is the per-pixel upstream gradient when defined.
void run_cells(const HeadGeometry& g, const at::Tensor& scores, const at::Tensor& target,
               const std::optional<at::Tensor>& weight, int64_t ignore_index, const at::Tensor& grad_loss,
               const at::Tensor& loss, const at::Tensor& cells) {
  const int64_t num_cells = g.n * g.cr * g.cq;
  if (num_cells == 0) return;
  const std::vector<double> wtab = cell_weights(g.f);
  std::atomic<bool> bad{false};
  std::atomic<int64_t> bad_label{0};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "upsample_ce_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* s = scores.data_ptr<scalar_t>();
    const int64_t* t = target.data_ptr<int64_t>();
    const acc_t* w = weight.has_value() ? weight->data_ptr<acc_t>() : nullptr;
    const acc_t* gl = grad_loss.defined() ? grad_loss.data_ptr<acc_t>() : nullptr;
    acc_t* loss_p = loss.defined() ? loss.data_ptr<acc_t>() : nullptr;
    acc_t* cells_p = cells.defined() ? cells.data_ptr<acc_t>() : nullptr;
    const int64_t ss[4] = {scores.stride(0), scores.stride(1), scores.stride(2), scores.stride(3)};
    const int64_t ts[3] = {target.stride(0), target.stride(1), target.stride(2)};
    const int64_t gs[3] = {gl ? grad_loss.stride(0) : 0, gl ? grad_loss.stride(1) : 0, gl ? grad_loss.stride(2) : 0};
    const int64_t C = g.c, cell_stride = g.cr * g.cq;
    // ~16K logits of work per task, as in the plain loss.
    const int64_t grain = std::max<int64_t>(1, 16384 / (C * g.f * g.f));
    at::parallel_for(0, num_cells, grain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> buf(C * kTile), taps(4 * C), partial(4 * C), ra(2 * g.f), cb(2 * g.f);
      acc_t wts[4 * kTile], upstream[kTile], tile_loss[kTile];
      int64_t labels[kTile], pix[kTile];
      for (int64_t cell = begin; cell < end; ++cell) {
        const int64_t cq = cell % g.cq, cr = (cell / g.cq) % g.cr, n = cell / cell_stride;
        const int64_t r = g.r0 + cr, q = g.q0 + cq;
        // Taps outside the input get weight 0 and a clamped (harmless) index.
        const bool row_ok[2] = {r - 1 >= 0, r < g.h}, col_ok[2] = {q - 1 >= 0, q < g.w};
        const int64_t row_at[2] = {row_ok[0] ? r - 1 : 0, row_ok[1] ? r : 0};
        const int64_t col_at[2] = {col_ok[0] ? q - 1 : 0, col_ok[1] ? q : 0};
        for (int64_t ab = 0; ab < 4; ++ab) {
          const scalar_t* src = s + n * ss[0] + row_at[ab / 2] * ss[2] + col_at[ab % 2] * ss[3];
          for (int64_t c = 0; c < C; ++c) taps[ab * C + c] = static_cast<acc_t>(src[c * ss[1]]);
        }
        std::fill(partial.begin(), partial.end(), acc_t(0));
        // Kept rows u_lo..u_hi-1 and columns v_lo..v_hi-1 of the cell, enumerated row-major kTile at a time.
        const int64_t u_lo = std::max<int64_t>(0, g.top - r * g.f), u_hi = std::min(g.f, g.top + g.H - r * g.f);
        const int64_t v_lo = std::max<int64_t>(0, g.left - q * g.f), v_hi = std::min(g.f, g.left + g.W - q * g.f);
        // The cell's tap weights per row offset (ra) and column offset (cb), 0 for taps outside the input.
        for (int64_t i = 0; i < g.f; ++i) {
          ra[i] = row_ok[0] ? static_cast<acc_t>(wtab[i]) : acc_t(0);
          ra[g.f + i] = row_ok[1] ? static_cast<acc_t>(wtab[g.f + i]) : acc_t(0);
          cb[i] = col_ok[0] ? static_cast<acc_t>(wtab[i]) : acc_t(0);
          cb[g.f + i] = col_ok[1] ? static_cast<acc_t>(wtab[g.f + i]) : acc_t(0);
        }
        const int64_t count = (u_hi - u_lo) * (v_hi - v_lo);
        int64_t u = u_lo, v = v_lo;  // the next lane's pixel, stepped row-major (no division per lane)
        for (int64_t p0 = 0; p0 < count; p0 += kTile) {
          const int64_t len = std::min(kTile, count - p0);
          for (int64_t j = 0; j < len; ++j) {
            const int64_t y = r * g.f + u - g.top, x = q * g.f + v - g.left;
            wts[j] = ra[u] * cb[v];
            wts[kTile + j] = ra[u] * cb[g.f + v];
            wts[2 * kTile + j] = ra[g.f + u] * cb[v];
            wts[3 * kTile + j] = ra[g.f + u] * cb[g.f + v];
            labels[j] = t[n * ts[0] + y * ts[1] + x * ts[2]];
            pix[j] = (n * g.H + y) * g.W + x;
            if (gl != nullptr) {
              upstream[j] = labels[j] == ignore_index ? acc_t(0) : gl[n * gs[0] + y * gs[1] + x * gs[2]];
            }
            if (++v == v_hi) v = v_lo, ++u;
          }
          for (int64_t j = len; j < kTile; ++j) {  // padding lanes: zero weights give finite logits, no gradient
            wts[j] = wts[kTile + j] = wts[2 * kTile + j] = wts[3 * kTile + j] = 0;
            labels[j] = ignore_index, upstream[j] = 0;
          }
          if (head_tile(buf.data(), C, taps.data(), wts, labels, ignore_index, w, gl ? upstream : nullptr,
                        tile_loss, cells_p ? partial.data() : nullptr)) {
            for (int64_t j = 0; j < len; ++j) {
              if (labels[j] != ignore_index && (labels[j] < 0 || labels[j] >= C)) bad_label.store(labels[j]);
            }
            bad.store(true);
          }
          if (loss_p != nullptr) {
            for (int64_t j = 0; j < len; ++j) loss_p[pix[j]] = tile_loss[j];
          }
        }
        if (cells_p != nullptr) {
          for (int64_t ab = 0; ab < 4; ++ab) {
            for (int64_t c = 0; c < C; ++c) {
              cells_p[(((ab * g.n + n) * C + c) * g.cr + cr) * g.cq + cq] = partial[ab * C + c];
            }
          }
        }
      }
    });
  });
  TORCH_CHECK_VALUE(!bad.load(), "target contains label ", bad_label.load(), ", outside [0, ", g.c,
                    ") and not ignore_index (", ignore_index, ")");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> upsample_ce_fwd_cpu(const at::Tensor& scores, const at::Tensor& target,
                                                       const std::optional<at::Tensor>& weight, int64_t factor,
                                                       int64_t top, int64_t left, int64_t ignore_index,
                                                       bool with_grad) {
  const HeadGeometry g = make_head_geometry(scores, target, weight, factor, top, left);
  const auto opts = scores.options().dtype(acc_type_of(scores));
  at::Tensor loss = at::empty({g.n, g.H, g.W}, opts);
  maybe_poison(loss);
  at::Tensor cells;
  if (with_grad) {
    cells = at::empty({4, g.n, g.c, g.cr, g.cq}, opts);
    maybe_poison(cells);
  }
  run_cells(g, scores, target, weight, ignore_index, at::Tensor(), loss, cells);
  return {loss, with_grad ? combine_cell_grad_cpu(cells, g) : at::empty({0}, opts)};
}

at::Tensor upsample_ce_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& scores, const at::Tensor& target,
                               const std::optional<at::Tensor>& weight, int64_t factor, int64_t top, int64_t left,
                               int64_t ignore_index) {
  const HeadGeometry g = make_head_geometry(scores, target, weight, factor, top, left);
  check_head_grad_loss(grad_loss, scores, g);
  const auto acc = acc_type_of(scores);
  at::Tensor cells = at::empty({4, g.n, g.c, g.cr, g.cq}, scores.options().dtype(acc));
  maybe_poison(cells);
  run_cells(g, scores, target, weight, ignore_index, grad_loss, at::Tensor(), cells);
  return combine_cell_grad_cpu(cells, g);
}

}  // namespace fcnkern

TORCH_LIBRARY_IMPL(fcnkern, CPU, m) {
  m.impl("upsample_ce_fwd", &fcnkern::upsample_ce_fwd_cpu);
  m.impl("upsample_ce_bwd", &fcnkern::upsample_ce_bwd_cpu);
}
