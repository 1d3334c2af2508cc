// CUDA kernels of the fused pixelwise softmax cross-entropy (see cross_entropy.h for the maths).
//
// One thread per pixel walks the C classes with stride H*W: neighbouring threads hold neighbouring pixels, so
// every class step is one coalesced warp load. The forward keeps an online max and rescaled sum in registers
// (one pass, one exp per logit); classes go four at a time so that four loads are in flight per thread. In training
// the forward also writes the gradient for an upstream gradient of 1 (kWithGrad), which the backward scales in place
// only when the upstream value, read on the device, is not 1 (ce_scale_kernel; fcnkern/cross_entropy.py). With up
// to 32 classes (FCN's 21) the forward holds the pixel's logits in registers (ce_fwd_regs_kernel,
// cross_entropy_pixel.h): in training it reads them once instead of sweeping them twice.
//
// Labels outside [0, C) that are not ignore_index cannot raise here without a host sync: the kernel never
// indexes with them, writes NaN as that pixel's loss (so the reduced loss is NaN, not silently wrong) and the
// Python layer documents how to check labels eagerly (fcnkern.pixelwise_cross_entropy(check_labels=True)).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <cmath>
#include <limits>

#include "common.h"
#include "cuda_ops.h"
#include "cross_entropy.h"
#include "cross_entropy_pixel.h"
#include "cuda_grid.h"
#include "cuda_math.h"
#include "fast_div.h"

namespace fcnkern {
namespace {

constexpr int kThreads = 256;

int64_t grid_for(int64_t num_pixels) { return grid_blocks(num_pixels, kThreads, 16); }

// Strides of the per-pixel view of a tensor: element offset of pixel (n, h, w).
struct PixelStrides {
  int64_t n, h, w;
  __device__ __forceinline__ int64_t at(int64_t ni, int64_t hi, int64_t wi) const { return ni * n + hi * h + wi * w; }
};

PixelStrides pixel_strides(const at::Tensor& t) {
  const int64_t d = t.dim();
  return {t.stride(0), t.stride(d - 2), t.stride(d - 1)};
}

struct Shape {
  int64_t N, C, H, W;
};

// gx[c] = g * (softmax(x)[c] - [c == label]) over one pixel's classes, from the softmax statistics m (max) and
// ls (log sum exp(x - m)); g is the upstream gradient times the label's class weight (0 ignored, NaN bad label).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_grad(const scalar_t* xp, int64_t x_sc, scalar_t* gp, int64_t g_sc, acc_t g,
                                           acc_t m, acc_t ls, int64_t label, int64_t C) {
#pragma unroll 4
  for (int64_t c = 0; c < C; ++c) {
    gp[c * g_sc] = static_cast<scalar_t>(ce_pixel::class_grad(static_cast<acc_t>(xp[c * x_sc]), m, ls, g, c == label));
  }
}

// kWithGrad: instead of the statistics, the logits' gradient for an upstream gradient of 1, from a second sweep
// over the pixel's classes, which the thread has just read (L1/L2 hits, not DRAM).
template <typename scalar_t, typename acc_t, bool kWithGrad>
__global__ void __launch_bounds__(kThreads)
    ce_fwd_kernel(const scalar_t* __restrict__ x, PixelStrides xs, int64_t x_sc, const int64_t* __restrict__ t,
                  PixelStrides ts, const acc_t* __restrict__ weight, int64_t ignore_index, Shape shape,
                  acc_t* __restrict__ loss, acc_t* __restrict__ stats, scalar_t* __restrict__ gx, PixelStrides gs,
                  int64_t g_sc) {
  const int64_t num_pixels = shape.N * shape.H * shape.W;
  const int64_t C = shape.C;
  for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < num_pixels;
       p += int64_t(gridDim.x) * blockDim.x) {
    const int64_t wi = p % shape.W, hi = (p / shape.W) % shape.H, ni = p / (shape.W * shape.H);
    const scalar_t* xp = x + xs.at(ni, hi, wi);
    const int64_t label = t[ts.at(ni, hi, wi)];
    acc_t m = -std::numeric_limits<acc_t>::infinity(), s = 0, xt = 0;
    int64_t c = 0;
    for (; c + 4 <= C; c += 4) {
      const acc_t v0 = static_cast<acc_t>(xp[c * x_sc]), v1 = static_cast<acc_t>(xp[(c + 1) * x_sc]);
      const acc_t v2 = static_cast<acc_t>(xp[(c + 2) * x_sc]), v3 = static_cast<acc_t>(xp[(c + 3) * x_sc]);
      const acc_t mx = max(max(v0, v1), max(v2, v3));
      if (mx > m) {
        s *= exp_acc(m - mx);
        m = mx;
      }
      s += exp_acc(v0 - m) + exp_acc(v1 - m) + exp_acc(v2 - m) + exp_acc(v3 - m);
      const int64_t d = label - c;
      xt = d == 0 ? v0 : d == 1 ? v1 : d == 2 ? v2 : d == 3 ? v3 : xt;
    }
    for (; c < C; ++c) {
      const acc_t v = static_cast<acc_t>(xp[c * x_sc]);
      if (v > m) {
        s *= exp_acc(m - v);
        m = v;
      }
      s += exp_acc(v - m);
      xt = label == c ? v : xt;
    }
    const acc_t ls = ::log(s);
    const acc_t g = ce_pixel::label_factor(label, ce_pixel::class_of(label, static_cast<int>(C)), ignore_index, weight);
    loss[p] = label == ignore_index ? acc_t(0) : g * ((m - xt) + ls);
    if constexpr (kWithGrad) {
      store_grad(xp, x_sc, gx + gs.at(ni, hi, wi), g_sc, g, m, ls, label, C);
    } else {
      stats[p] = m;
      stats[num_pixels + p] = ls;
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    ce_bwd_kernel(const acc_t* __restrict__ grad_loss, PixelStrides gls, const scalar_t* __restrict__ x,
                  PixelStrides xs, int64_t x_sc, const int64_t* __restrict__ t, PixelStrides ts,
                  const acc_t* __restrict__ weight, const acc_t* __restrict__ stats, int64_t ignore_index, Shape shape,
                  scalar_t* __restrict__ gx, PixelStrides gs, int64_t g_sc) {
  const int64_t num_pixels = shape.N * shape.H * shape.W;
  const int64_t C = shape.C;
  for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < num_pixels;
       p += int64_t(gridDim.x) * blockDim.x) {
    const int64_t wi = p % shape.W, hi = (p / shape.W) % shape.H, ni = p / (shape.W * shape.H);
    const scalar_t* xp = x + xs.at(ni, hi, wi);
    scalar_t* gp = gx + gs.at(ni, hi, wi);
    const int64_t label = t[ts.at(ni, hi, wi)];
    const acc_t factor = ce_pixel::label_factor(label, ce_pixel::class_of(label, static_cast<int>(C)), ignore_index,
                                                weight);
    const acc_t g = label == ignore_index ? acc_t(0) : grad_loss[gls.at(ni, hi, wi)] * factor;
    store_grad(xp, x_sc, gp, g_sc, g, stats[p], stats[num_pixels + p], label, C);
  }
}

// The forward for C <= ce_pixel::kMaxC: each logit read once, into registers (cross_entropy_pixel.h); kWithGrad as
// in ce_fwd_kernel. Both variants compute the statistics alike, so that a gradient recomputed from the saved
// statistics (ce_bwd_kernel) equals the one the training forward wrote, bit for bit. Pixels are decoded with
// multiply-shift dividers in 32 bits where the grid's indices fit (div_t = FastDiv32), with 64-bit division
// otherwise (PlainDiv64): the decode was ~3 64-bit divisions per pixel of ~21 classes.
template <typename scalar_t, typename acc_t, bool kWithGrad, typename index_t, typename div_t>
__global__ void __launch_bounds__(kThreads)
    ce_fwd_regs_kernel(const scalar_t* __restrict__ x, PixelStrides xs, int64_t x_sc, const int64_t* __restrict__ t,
                       PixelStrides ts, const acc_t* __restrict__ weight, int64_t ignore_index, int C,
                       index_t num_pixels, div_t w_div, div_t h_div, acc_t* __restrict__ loss,
                       acc_t* __restrict__ stats, scalar_t* __restrict__ gx, PixelStrides gs, int64_t g_sc) {
  using namespace ce_pixel;
  for (index_t p = blockIdx.x * index_t(blockDim.x) + threadIdx.x; p < num_pixels;
       p += index_t(gridDim.x) * blockDim.x) {
    const index_t nh = w_div.div(p), wi = p - nh * w_div.d;
    const index_t ni = h_div.div(nh), hi = nh - ni * h_div.d;
    const int64_t label = t[ts.at(ni, hi, wi)];
    const int k = class_of(label, C);
    const Pixel<kMaxC, acc_t> px = load_pixel<kMaxC>(x + xs.at(ni, hi, wi), x_sc, C, k);
    const acc_t g = label_factor(label, k, ignore_index, weight);
    loss[p] = pixel_loss(px, label, ignore_index, g);
    if constexpr (kWithGrad) {
      store_pixel_grad(px, gx + gs.at(ni, hi, wi), g_sc, C, k, g);
    } else {
      stats[p] = px.m;
      stats[num_pixels + p] = px.ls;
    }
  }
}

template <typename scalar_t, typename acc_t, bool kWithGrad>
void launch_fwd_regs(const at::Tensor& logits, const at::Tensor& target, const acc_t* weight, int64_t ignore_index,
                     const Shape& shape, at::Tensor& loss, at::Tensor& second) {
  const int64_t num_pixels = loss.numel(), blocks = grid_for(num_pixels);
  const auto launch = [&](auto index, auto w_div, auto h_div) {
    using index_t = decltype(index);
    ce_fwd_regs_kernel<scalar_t, acc_t, kWithGrad, index_t>
        <<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            logits.data_ptr<scalar_t>(), pixel_strides(logits), logits.stride(1), target.data_ptr<int64_t>(),
            pixel_strides(target), weight, ignore_index, static_cast<int>(shape.C),
            static_cast<index_t>(num_pixels), w_div, h_div, loss.data_ptr<acc_t>(),
            kWithGrad ? nullptr : second.data_ptr<acc_t>(), kWithGrad ? second.data_ptr<scalar_t>() : nullptr,
            kWithGrad ? pixel_strides(second) : PixelStrides{0, 0, 0}, kWithGrad ? second.stride(1) : 0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  // 32 bits while the grid-stride loop's last step stays under 2^31.
  if (num_pixels + blocks * kThreads < (int64_t(1) << 31)) {
    launch(int32_t{}, FastDiv32(static_cast<int32_t>(shape.W)), FastDiv32(static_cast<int32_t>(shape.H)));
  } else {
    launch(int64_t{}, PlainDiv64(shape.W), PlainDiv64(shape.H));
  }
}

// The scale rule of pixelwise_ce_scale_grad_: nothing when scale is 1, zeros kept zero. Every thread reads the one
// scale value; with 1 (the usual loss.backward()) the kernel touches no gradient element.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) ce_scale_kernel(scalar_t* __restrict__ gx, const acc_t* __restrict__ scale,
                                                            int64_t numel) {
  const acc_t s = *scale;
  if (s == acc_t(1)) return;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < numel; i += int64_t(gridDim.x) * blockDim.x) {
    const acc_t v = static_cast<acc_t>(gx[i]);
    if (v != acc_t(0)) gx[i] = static_cast<scalar_t>(v * s);
  }
}

}  // namespace

namespace {

// The forward of both ops: (loss, stats), or with_grad (loss, gradient for an upstream gradient of 1).
std::tuple<at::Tensor, at::Tensor> forward_cuda(const at::Tensor& logits, const at::Tensor& target,
                                                const std::optional<at::Tensor>& weight, int64_t ignore_index,
                                                bool with_grad) {
  check_ce_args(logits, target, weight);
  const c10::cuda::CUDAGuard guard(logits.device());
  const Shape shape{logits.size(0), logits.size(1), logits.size(2), logits.size(3)};
  auto opts = logits.options().dtype(acc_type_of(logits));
  at::Tensor loss = at::empty({shape.N, shape.H, shape.W}, opts);
  at::Tensor second = with_grad ? at::empty_like(logits) : at::empty({2, shape.N, shape.H, shape.W}, opts);
  maybe_poison(loss);
  maybe_poison(second);
  const int64_t num_pixels = loss.numel();
  if (num_pixels == 0) return {loss, second};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "pixelwise_ce_fwd_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    if (shape.C <= ce_pixel::kMaxC) {
      const acc_t* w = weight.has_value() ? weight->data_ptr<acc_t>() : nullptr;
      if (with_grad) {
        launch_fwd_regs<scalar_t, acc_t, true>(logits, target, w, ignore_index, shape, loss, second);
      } else {
        launch_fwd_regs<scalar_t, acc_t, false>(logits, target, w, ignore_index, shape, loss, second);
      }
      return;
    }
    // The two variants share one signature: the statistics or the gradient pointer is null.
    const auto kernel = with_grad ? ce_fwd_kernel<scalar_t, acc_t, true> : ce_fwd_kernel<scalar_t, acc_t, false>;
    kernel<<<grid_for(num_pixels), kThreads, 0, stream>>>(
        logits.data_ptr<scalar_t>(), pixel_strides(logits), logits.stride(1), target.data_ptr<int64_t>(),
        pixel_strides(target), weight.has_value() ? weight->data_ptr<acc_t>() : nullptr, ignore_index, shape,
        loss.data_ptr<acc_t>(), with_grad ? nullptr : second.data_ptr<acc_t>(),
        with_grad ? second.data_ptr<scalar_t>() : nullptr, with_grad ? pixel_strides(second) : PixelStrides{0, 0, 0},
        with_grad ? second.stride(1) : 0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, second};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> pixelwise_ce_fwd_cuda(const at::Tensor& logits, const at::Tensor& target,
                                                         const std::optional<at::Tensor>& weight,
                                                         int64_t ignore_index) {
  return forward_cuda(logits, target, weight, ignore_index, false);
}

std::tuple<at::Tensor, at::Tensor> pixelwise_ce_fwd_grad_cuda(const at::Tensor& logits, const at::Tensor& target,
                                                              const std::optional<at::Tensor>& weight,
                                                              int64_t ignore_index) {
  return forward_cuda(logits, target, weight, ignore_index, true);
}

void pixelwise_ce_scale_grad_cuda(const at::Tensor& grad, const at::Tensor& scale) {
  check_ce_scale_args(grad, scale);
  const int64_t numel = grad.numel();
  if (numel == 0) return;
  const c10::cuda::CUDAGuard guard(grad.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "pixelwise_ce_scale_grad_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    ce_scale_kernel<scalar_t, acc_t><<<grid_for(numel), kThreads, 0, stream>>>(grad.data_ptr<scalar_t>(),
                                                                              scale.data_ptr<acc_t>(), numel);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor pixelwise_ce_bwd_cuda(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                                 const std::optional<at::Tensor>& weight, const at::Tensor& stats,
                                 int64_t ignore_index) {
  check_ce_args(logits, target, weight);
  check_ce_bwd_args(grad_loss, logits, stats);
  const c10::cuda::CUDAGuard guard(logits.device());
  const Shape shape{logits.size(0), logits.size(1), logits.size(2), logits.size(3)};
  at::Tensor grad = at::empty_like(logits);
  maybe_poison(grad);
  const int64_t num_pixels = shape.N * shape.H * shape.W;
  if (grad.numel() == 0) return grad;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "pixelwise_ce_bwd_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    ce_bwd_kernel<scalar_t, acc_t><<<grid_for(num_pixels), kThreads, 0, stream>>>(
        grad_loss.data_ptr<acc_t>(), pixel_strides(grad_loss), logits.data_ptr<scalar_t>(), pixel_strides(logits),
        logits.stride(1), target.data_ptr<int64_t>(), pixel_strides(target),
        weight.has_value() ? weight->data_ptr<acc_t>() : nullptr, stats.data_ptr<acc_t>(), ignore_index, shape,
        grad.data_ptr<scalar_t>(), pixel_strides(grad), grad.stride(1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad;
}

}  // namespace fcnkern
