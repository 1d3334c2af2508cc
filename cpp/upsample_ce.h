// Fused FCN head: fixed bilinear upsampling by f + crop + pixelwise softmax cross-entropy, without ever forming the
// N x C x H x W full-resolution logits or their gradient. Shared declarations of the CPU and CUDA kernels.
//
// Cells. Full-output row Y = r f + u (0 <= u < f) has exactly two bilinear taps, input rows r - 1 and r, with
// weights 1 - (u + 1/2) / f and (u + 1/2) / f (0 where the row lies outside the input); columns alike. So the f x f
// full-output pixels of cell (r, q) all read the same 2 x 2 x C low-resolution scores, and each pixel's logits are
// logit[c] = sum over ab of w_ab(u, v) s_ab[c], with ab = 2 a + b, a the row tap (0: r - 1, 1: r), b the column tap.
// A kernel owns whole cells (or, in Triton, slices of one), so the forward needs no atomics.
//
// Gradient. Each cell reduces its pixels' logit gradients into four C-vectors, P_ab[c] = sum over its kept pixels of
// w_ab dlogit[c]: `cells`, 4 x N x C x CR x CQ in the accumulation dtype, for the CR x CQ cells the kept window
// touches (rows r0 = top / f .. (top + H - 1) / f, columns likewise). combine_one sums, for every
// low-resolution pixel, the four partials of the cells that tap it, in a fixed order: deterministic.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "common.h"

namespace fcnkern {

struct HeadGeometry {
  int64_t n, c, h, w, H, W, f, top, left, r0, q0, cr, cq;
};

// Checks every argument (raises ValueError/TypeError through c10) and derives the cells the window covers.
HeadGeometry make_head_geometry(const at::Tensor& scores, const at::Tensor& target,
                                const std::optional<at::Tensor>& weight, int64_t factor, int64_t top, int64_t left);

// The backward's per-pixel upstream gradient: N x H x W in the accumulation dtype, on the scores' device.
void check_head_grad_loss(const at::Tensor& grad_loss, const at::Tensor& scores, const HeadGeometry& g);

// The gradient of score pixel (n, c, i, j) from the contiguous partials `cells`: it is tap (a, b) of cell
// (i + 1 - a, j + 1 - b), so up to four cells' partials, added in the fixed order ab = 3, 2, 1, 0 (deterministic;
// a pixel no kept cell taps gets 0). Shared by the CPU loop and the CUDA kernel.
template <typename acc_t>
FCNK_HD inline acc_t combine_one(const acc_t* cells, const HeadGeometry& g, int64_t n, int64_t c, int64_t i,
                                 int64_t j) {
  acc_t sum = 0;
  for (int64_t ab = 3; ab >= 0; --ab) {
    const int64_t cr = i + 1 - ab / 2 - g.r0, cq = j + 1 - ab % 2 - g.q0;
    if (cr < 0 || cr >= g.cr || cq < 0 || cq >= g.cq) continue;
    sum += cells[(((ab * g.n + n) * g.c + c) * g.cr + cr) * g.cq + cq];
  }
  return sum;
}

// cells 4 x N x C x CR x CQ (contiguous, on the CPU) -> gradient N x C x h x w, by combine_one.
at::Tensor combine_cell_grad_cpu(const at::Tensor& cells, const HeadGeometry& g);

// (loss N x H x W in the accumulation dtype; with with_grad the gradient N x C x h x w of loss.sum() with respect to
// the scores, in the accumulation dtype, else an empty tensor). Bad labels: ValueError on the CPU; a NaN loss (and
// gradient) on CUDA, where raising would need a host sync.
std::tuple<at::Tensor, at::Tensor> upsample_ce_fwd_cpu(const at::Tensor& scores, const at::Tensor& target,
                                                       const std::optional<at::Tensor>& weight, int64_t factor,
                                                       int64_t top, int64_t left, int64_t ignore_index,
                                                       bool with_grad);
// Gradient N x C x h x w (accumulation dtype) of sum(grad_loss * loss) with respect to the scores, recomputing the
// softmax: the path for a per-pixel upstream gradient (reduction="none").
at::Tensor upsample_ce_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& scores, const at::Tensor& target,
                               const std::optional<at::Tensor>& weight, int64_t factor, int64_t top, int64_t left,
                               int64_t ignore_index);

}  // namespace fcnkern
