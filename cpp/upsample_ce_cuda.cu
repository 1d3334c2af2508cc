// CUDA kernel of the fused FCN head (bilinear upsampling + crop + softmax cross-entropy; see upsample_ce.h).
//
// One block per cell: all of a cell's pixels read the same 2 x 2 x C scores (uniform loads, broadcast from L1), and
// a thread per kept pixel builds each logit with four multiply-adds as it needs it, so nothing full-resolution is
// ever stored but the N x H x W loss. Per pixel: a max sweep, an exp-sum sweep (loss), and with a gradient a third
// sweep whose logit gradients are reduced over the cell's pixels 32 classes at a time: an xor-shuffle tree per warp,
// then the warps' sums added in warp order by one thread per (tap, class) into the cell's partials, which only this
// block touches. Fixed order everywhere, no atomics: deterministic run to run.
//
// Bad labels (outside [0, C), not ignore_index) make that pixel's loss and gradient NaN without indexing with them;
// raising would need a host sync (see fcnkern/upsample_ce.py).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <limits>

#include "common.h"
#include "cuda_ops.h"
#include "cuda_grid.h"
#include "cuda_math.h"
#include "upsample_ce.h"

namespace fcnkern {
namespace {

constexpr int kMaxWarps = 8;
constexpr int kClassChunk = 32;

struct HeadArgs {
  int64_t n, c, h, w, H, W, f, top, left, r0, q0, cr, cq, ignore_index;
  int64_t ss[4], ts[3], gs[3];
};

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int step = 16; step > 0; step >>= 1) v += __shfl_xor_sync(0xffffffffu, v, step);
  return v;
}

// loss (N x H x W, contiguous) is written when non-null; cells (4 x N x C x CR x CQ, zero on entry) accumulate
// the partials when non-null; grad_loss is the per-pixel upstream gradient when non-null (else 1).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMaxWarps * 32)
    head_kernel(const scalar_t* __restrict__ scores, const int64_t* __restrict__ target,
                const acc_t* __restrict__ weight, const acc_t* __restrict__ grad_loss, HeadArgs a,
                acc_t* __restrict__ loss, acc_t* __restrict__ cells) {
  __shared__ acc_t red[kMaxWarps][4][kClassChunk];
  // 32-bit: the cell count is < 2^31 (checked at launch); see p32 below.
  const int32_t cell = blockIdx.x, cq32 = static_cast<int32_t>(a.cq), cr32 = static_cast<int32_t>(a.cr);
  const int64_t cq = cell % cq32, cr = (cell / cq32) % cr32, n = cell / (cq32 * cr32);
  const int64_t r = a.r0 + cr, q = a.q0 + cq, C = a.c;
  const bool row_ok0 = r - 1 >= 0, row_ok1 = r < a.h, col_ok0 = q - 1 >= 0, col_ok1 = q < a.w;
  const scalar_t* base = scores + n * a.ss[0];
  const scalar_t* tap00 = base + (row_ok0 ? r - 1 : 0) * a.ss[2] + (col_ok0 ? q - 1 : 0) * a.ss[3];
  const scalar_t* tap01 = base + (row_ok0 ? r - 1 : 0) * a.ss[2] + (col_ok1 ? q : 0) * a.ss[3];
  const scalar_t* tap10 = base + (row_ok1 ? r : 0) * a.ss[2] + (col_ok0 ? q - 1 : 0) * a.ss[3];
  const scalar_t* tap11 = base + (row_ok1 ? r : 0) * a.ss[2] + (col_ok1 ? q : 0) * a.ss[3];
  const int64_t u_lo = max(int64_t(0), a.top - r * a.f), u_hi = min(a.f, a.top + a.H - r * a.f);
  const int64_t v_lo = max(int64_t(0), a.left - q * a.f), v_hi = min(a.f, a.left + a.W - q * a.f);
  const int64_t nv = v_hi - v_lo, count = (u_hi - u_lo) * nv;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();

  for (int64_t p0 = 0; p0 < count; p0 += blockDim.x) {
    const int64_t p = p0 + threadIdx.x;
    const bool active = p < count;
    // 32-bit divisions here and above: count <= f^2 < 2^31 (checked at launch), and a 64-bit division is a
    // subroutine call, which made ptxas spill.
    const int32_t p32 = static_cast<int32_t>(p), nv32 = static_cast<int32_t>(nv);
    const int64_t u = u_lo + (active ? p32 / nv32 : 0), v = v_lo + (active ? p32 % nv32 : 0);
    const int64_t y = r * a.f + u - a.top, x = q * a.f + v - a.left;
    const acc_t a1 = (acc_t(u) + acc_t(0.5)) / acc_t(a.f), b1 = (acc_t(v) + acc_t(0.5)) / acc_t(a.f);
    const acc_t ra[2] = {row_ok0 ? acc_t(1) - a1 : acc_t(0), row_ok1 ? a1 : acc_t(0)};
    const acc_t cb[2] = {col_ok0 ? acc_t(1) - b1 : acc_t(0), col_ok1 ? b1 : acc_t(0)};
    const acc_t w00 = ra[0] * cb[0], w01 = ra[0] * cb[1], w10 = ra[1] * cb[0], w11 = ra[1] * cb[1];
    const int64_t label = active ? target[n * a.ts[0] + y * a.ts[1] + x * a.ts[2]] : a.ignore_index;
    const bool ignored = label == a.ignore_index, in_range = label >= 0 && label < C;
    auto logit = [&](int64_t c) {
      return w00 * static_cast<acc_t>(tap00[c * a.ss[1]]) + w01 * static_cast<acc_t>(tap01[c * a.ss[1]]) +
             w10 * static_cast<acc_t>(tap10[c * a.ss[1]]) + w11 * static_cast<acc_t>(tap11[c * a.ss[1]]);
    };
    acc_t m = -std::numeric_limits<acc_t>::infinity();
    for (int64_t c = 0; c < C; ++c) m = max(m, logit(c));
    acc_t s = 0, xt = 0;
    for (int64_t c = 0; c < C; ++c) {
      const acc_t l = logit(c);
      s += exp_acc(l - m);
      xt = c == label ? l : xt;
    }
    const acc_t ls = log_acc(s);
    const acc_t cw = (weight != nullptr && in_range) ? weight[label] : acc_t(1);
    if (loss != nullptr && active) {
      loss[(n * a.H + y) * a.W + x] = ignored ? acc_t(0) : (in_range ? cw * ((m - xt) + ls) : nan);
    }
    if (cells == nullptr) continue;  // uniform across the block
    acc_t g = grad_loss != nullptr && active && !ignored ? grad_loss[n * a.gs[0] + y * a.gs[1] + x * a.gs[2]]
                                                           : acc_t(1);
    g = (!active || ignored) ? acc_t(0) : (in_range ? g * cw : nan);
    for (int64_t c0 = 0; c0 < C; c0 += kClassChunk) {
      const int64_t len = min(int64_t(kClassChunk), C - c0);
      for (int64_t cc = 0; cc < len; ++cc) {
        const int64_t c = c0 + cc;
        const acc_t prob = exp_acc((logit(c) - m) - ls);
        const acc_t d = g == acc_t(0) ? acc_t(0) : g * (c == label ? prob - acc_t(1) : prob);
        const acc_t s00 = warp_sum(w00 * d), s01 = warp_sum(w01 * d), s10 = warp_sum(w10 * d),
                    s11 = warp_sum(w11 * d);
        if (lane == 0) {
          red[warp][0][cc] = s00, red[warp][1][cc] = s01, red[warp][2][cc] = s10, red[warp][3][cc] = s11;
        }
      }
      __syncthreads();
      const int len32 = static_cast<int>(len);
      for (int idx = threadIdx.x; idx < 4 * len32; idx += blockDim.x) {  // 128 sums; a block may have 32 threads
        const int ab = idx / len32, cc = idx % len32;
        acc_t sum = 0;
        for (int k = 0; k < warps; ++k) sum += red[k][ab][cc];
        cells[(((ab * a.n + n) * C + c0 + cc) * a.cr + cr) * a.cq + cq] += sum;
      }
      __syncthreads();
    }
  }
}

// A thread per score-gradient element (grid-stride), each summing its up-to-four cell partials (combine_one):
// one launch where a zero fill and four strided adds took five.
template <typename acc_t>
__global__ void combine_kernel(const acc_t* __restrict__ cells, HeadGeometry g, acc_t* __restrict__ grad,
                               int64_t total) {
  FCNK_GRID_STRIDE(e, total) {
    const int64_t j = e % g.w, i = (e / g.w) % g.h, nc = e / (g.w * g.h);
    grad[e] = combine_one(cells, g, nc / g.c, nc % g.c, i, j);
  }
}

at::Tensor combine_cell_grad_cuda(const at::Tensor& cells, const HeadGeometry& g) {
  at::Tensor grad = at::empty({g.n, g.c, g.h, g.w}, cells.options());
  const int64_t total = grad.numel();
  if (total == 0) return grad;
  const at::cuda::CUDAGuard guard(cells.device());
  constexpr int kThreads = 256;
  const int64_t blocks = grid_blocks(total, kThreads, 32);
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(cells.scalar_type(), "combine_cell_grad_cuda", [&] {
    combine_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(cells.data_ptr<scalar_t>(), g,
                                                              grad.data_ptr<scalar_t>(), total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad;
}

void launch(const HeadGeometry& g, const at::Tensor& scores, const at::Tensor& target,
            const std::optional<at::Tensor>& weight, int64_t ignore_index, const at::Tensor& grad_loss,
            const at::Tensor& loss, const at::Tensor& cells) {
  const int64_t num_cells = g.n * g.cr * g.cq;
  if (num_cells == 0) return;
  TORCH_CHECK_VALUE(num_cells < (int64_t(1) << 31), "too many cells for one launch");
  TORCH_CHECK_VALUE(g.f * g.f < (int64_t(1) << 31), "upsampling factor ", g.f, " too large");
  const at::cuda::CUDAGuard guard(scores.device());
  HeadArgs a{g.n, g.c, g.h, g.w, g.H, g.W, g.f, g.top, g.left, g.r0, g.q0, g.cr, g.cq, ignore_index, {}, {}, {}};
  for (int i = 0; i < 4; ++i) a.ss[i] = scores.stride(i);
  for (int i = 0; i < 3; ++i) a.ts[i] = target.stride(i), a.gs[i] = grad_loss.defined() ? grad_loss.stride(i) : 0;
  // A warp per 32 pixels of a cell, at most kMaxWarps: an FCN-8s cell (8 x 8) gets two, an FCN-32s cell eight.
  const int threads = static_cast<int>(std::min<int64_t>(kMaxWarps, (g.f * g.f + 31) / 32) * 32);
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "upsample_ce_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    head_kernel<scalar_t, acc_t><<<num_cells, threads, 0, stream>>>(
        scores.data_ptr<scalar_t>(), target.data_ptr<int64_t>(),
        weight.has_value() ? weight->data_ptr<acc_t>() : nullptr,
        grad_loss.defined() ? grad_loss.data_ptr<acc_t>() : nullptr, a,
        loss.defined() ? loss.data_ptr<acc_t>() : nullptr, cells.defined() ? cells.data_ptr<acc_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> upsample_ce_fwd_cuda(const at::Tensor& scores, const at::Tensor& target,
                                                        const std::optional<at::Tensor>& weight, int64_t factor,
                                                        int64_t top, int64_t left, int64_t ignore_index,
                                                        bool with_grad) {
  const HeadGeometry g = make_head_geometry(scores, target, weight, factor, top, left);
  const auto opts = scores.options().dtype(acc_type_of(scores));
  at::Tensor loss = at::empty({g.n, g.H, g.W}, opts);
  maybe_poison(loss);
  at::Tensor cells = with_grad ? at::zeros({4, g.n, g.c, g.cr, g.cq}, opts) : at::Tensor();
  launch(g, scores, target, weight, ignore_index, at::Tensor(), loss, cells);
  return {loss, with_grad ? combine_cell_grad_cuda(cells, g) : at::empty({0}, opts)};
}

at::Tensor upsample_ce_bwd_cuda(const at::Tensor& grad_loss, const at::Tensor& scores, const at::Tensor& target,
                                const std::optional<at::Tensor>& weight, int64_t factor, int64_t top, int64_t left,
                                int64_t ignore_index) {
  const HeadGeometry g = make_head_geometry(scores, target, weight, factor, top, left);
  check_head_grad_loss(grad_loss, scores, g);
  const auto acc = acc_type_of(scores);
  at::Tensor cells = at::zeros({4, g.n, g.c, g.cr, g.cq}, scores.options().dtype(acc));
  launch(g, scores, target, weight, ignore_index, grad_loss, at::Tensor(), cells);
  return combine_cell_grad_cuda(cells, g);
}

}  // namespace fcnkern
