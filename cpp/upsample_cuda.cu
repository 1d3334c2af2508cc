// CUDA kernels of upsampling with the crop folded in: fixed bilinear (fcnkern.bilinear_upsample_crop) and learned
// transposed convolution (fcnkern.upsample_crop). Gather formulation throughout: every thread owns its output
// elements and reads only what reaches them, so nothing outside the kept window is computed, there are no atomics
// and results do not depend on scheduling.
//
// - bilinear forward: 2 x 2 taps per kept output pixel, a block per tile of 16 output rows (each row's taps and
//   each column's worked out once for the tile).
// - bilinear backward, separable: a pass along the height (each (input row, output column) sums its 2f window
//   taps) into an fp32 intermediate one f-th the gradient's size, then one along the width.
// - learned forward: each output (n, co, Y, X) sums over its group's input channels and only the sub-kernel taps
//   ky = Y mod sh + t sh, kx = X mod sw + u sw that reach it.
// - learned dgrad: each input element sums the kept gradient over the kh x kw outputs it reaches.
// - learned wgrad: one block per weight element reduces x * dy over all input pixels with a fixed shared-memory
//   tree (deterministic); the bias gradient is ATen's sum of the kept gradient.
//
// These are CUDA-core kernels: the learned layers of an FCN have 21 channels, too narrow to feed tensor cores
// well (the Triton backend's tl.dot variant covers wide layers). Any strides; accumulation in fp32 (fp64 for fp64).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdlib>
#include <type_traits>

#include "common.h"
#include "cuda_ops.h"
#include "cuda_grid.h"
#include "upsample.h"
#include "upsample_cuda_elements.h"

namespace fcnkern {
namespace {

constexpr int kThreads = 256;

using namespace up_elements;

Strides4 strides_of(const at::Tensor& t) { return strides_in<int64_t>(t); }

int64_t grid_for(int64_t items) { return grid_blocks(items, kThreads, 32); }

// Output rows per block of the bilinear forward: their taps go to shared memory, and each thread reuses its
// columns' taps down them.
constexpr int kBilinearTileRows = 16;

// Blocks of the bilinear forward: one per tile of kBilinearTileRows output rows up to this many, then each takes
// several tiles.
constexpr int64_t kMaxRowBlocks = int64_t(1) << 20;

// Each kernel runs its element function (cpp/upsample_cuda_elements.h) over its elements; the bilinear forward, its
// row function over tiles of rows, one block per tile at a time, the block's threads along the rows.
template <typename scalar_t, typename acc_t, typename index_t, typename div_t>
__global__ void __launch_bounds__(kThreads)
    bilinear_fwd_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                        const BilinearFwdPlan<index_t, div_t> plan, index_t rows) {
  // An unsigned counter in the 32-bit plan: rows < 2^31 and gridDim.x * kBilinearTileRows <= 2^24, so no wrap.
  using counter_t = std::conditional_t<sizeof(index_t) == 4, uint32_t, int64_t>;
  __shared__ BilinearRowTaps<acc_t, index_t> taps[kBilinearTileRows];
  for (counter_t base = counter_t(blockIdx.x) * kBilinearTileRows; base < counter_t(rows);
       base += counter_t(gridDim.x) * kBilinearTileRows) {
    const index_t count = index_t(counter_t(rows) - base < kBilinearTileRows ? counter_t(rows) - base
                                                                               : counter_t(kBilinearTileRows));
    __syncthreads();  // the previous tile's taps are read by every thread before they are replaced
    if (index_t(threadIdx.x) < count) {
      taps[threadIdx.x] = bilinear_row_taps<acc_t>(index_t(base) + index_t(threadIdx.x), plan);
    }
    __syncthreads();
    bilinear_fwd_rows<scalar_t, acc_t>(taps, count, index_t(threadIdx.x), index_t(blockDim.x), x, out, plan);
  }
}

// FCNKERN_CUDA_WIDE_INDEX=1 forces the 64-bit plan: for timing one against the other on a GPU (bench/gpu_probe.py).
bool wide_index_forced() {
  const char* v = std::getenv("FCNKERN_CUDA_WIDE_INDEX");
  return v != nullptr && v[0] == '1';
}

template <int AXIS, typename src_t, typename dst_t, typename acc_t, typename index_t, typename div_t>
__global__ void __launch_bounds__(kThreads)
    bilinear_bwd_axis_kernel(const src_t* __restrict__ src, dst_t* __restrict__ dst,
                             const BilinearAxisPlan<index_t, div_t> plan, index_t total) {
  // An unsigned counter in the 32-bit plan: idx < total < 2^31 and one grid's threads fit in 2^31, so no wrap.
  using counter_t = std::conditional_t<sizeof(index_t) == 4, uint32_t, int64_t>;
  const counter_t grid = counter_t(gridDim.x) * blockDim.x;
  for (counter_t idx = counter_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < counter_t(total); idx += grid) {
    bilinear_bwd_axis_element<AXIS, src_t, dst_t, acc_t>(index_t(idx), src, dst, plan);
  }
}

// Both passes of the bilinear backward in index plan (index_t, div_t).
template <typename scalar_t, typename acc_t, typename index_t, typename div_t>
void launch_bilinear_bwd(const at::Tensor& grad, const at::Tensor& by_row, const at::Tensor& dx, int64_t factor,
                         int64_t top, int64_t left, cudaStream_t stream) {
  bilinear_bwd_axis_kernel<2, scalar_t, acc_t, acc_t><<<grid_for(by_row.numel()), kThreads, 0, stream>>>(
      grad.const_data_ptr<scalar_t>(), by_row.mutable_data_ptr<acc_t>(),
      bilinear_axis_plan<index_t, div_t>(grad, by_row, factor, top, grad.size(2)), index_t(by_row.numel()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  bilinear_bwd_axis_kernel<3, acc_t, scalar_t, acc_t><<<grid_for(dx.numel()), kThreads, 0, stream>>>(
      by_row.const_data_ptr<acc_t>(), dx.mutable_data_ptr<scalar_t>(),
      bilinear_axis_plan<index_t, div_t>(by_row, dx, factor, left, by_row.size(3)), index_t(dx.numel()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    learned_fwd_kernel(const scalar_t* __restrict__ x, Strides4 xs, const scalar_t* __restrict__ w, Strides4 ws,
                       const scalar_t* __restrict__ bias, scalar_t* __restrict__ out, Strides4 os, UpGeometry g) {
  FCNK_GRID_STRIDE(idx, g.n * g.cout * g.oh * g.ow) {
    learned_fwd_element<scalar_t, acc_t>(idx, x, xs, w, ws, bias, out, os, g);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    learned_dgrad_kernel(const scalar_t* __restrict__ dy, Strides4 gs, const scalar_t* __restrict__ w, Strides4 ws,
                         scalar_t* __restrict__ dx, Strides4 dxs, UpGeometry g) {
  FCNK_GRID_STRIDE(idx, g.n * g.cin * g.h * g.w) {
    learned_dgrad_element<scalar_t, acc_t>(idx, dy, gs, w, ws, dx, dxs, g);
  }
}

// One block per weight element (ci, col, ky, kx) of the contiguous Cin x Cout_g x kh x kw gradient.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    learned_wgrad_kernel(const scalar_t* __restrict__ dy, Strides4 gs, const scalar_t* __restrict__ x, Strides4 xs,
                         scalar_t* __restrict__ dw, UpGeometry g) {
  __shared__ acc_t partial[kThreads];
  const int64_t e = blockIdx.x;
  acc_t acc = 0;
  for (int64_t p = threadIdx.x; p < g.n * g.h * g.w; p += kThreads) {
    acc += learned_wgrad_term<scalar_t, acc_t>(e, p, dy, gs, x, xs, g);
  }
  partial[threadIdx.x] = acc;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) dw[e] = static_cast<scalar_t>(partial[0]);
}

}  // namespace

at::Tensor bilinear_upsample_crop_cuda(const at::Tensor& x, int64_t factor, int64_t top, int64_t left, int64_t out_h,
                                       int64_t out_w) {
  check_bilinear_args(x, factor, top, left, out_h, out_w);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), C = x.size(1);
  at::Tensor out = at::empty({N, C, out_h, out_w}, x.options(), x.suggest_memory_format());
  maybe_poison(out);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bilinear_upsample_crop_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto stream = at::cuda::getCurrentCUDAStream();
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    // A block as wide as the row (whole warps), at most kThreads: narrow rows do not leave most of a block idle.
    const int64_t rows = N * C * out_h, threads = std::min<int64_t>(kThreads, (out_w + 31) / 32 * 32);
    const int64_t blocks = std::min((rows + kBilinearTileRows - 1) / kBilinearTileRows, kMaxRowBlocks);
    if (bilinear_fwd_fits_32bit(x, out, factor) && !wide_index_forced()) {
      bilinear_fwd_kernel<scalar_t, acc_t><<<blocks, threads, 0, stream>>>(
          src, dst, bilinear_fwd_plan<int32_t, FastDiv32>(x, out, factor, top, left), int32_t(rows));
    } else {
      bilinear_fwd_kernel<scalar_t, acc_t><<<blocks, threads, 0, stream>>>(
          src, dst, bilinear_fwd_plan<int64_t, PlainDiv64>(x, out, factor, top, left), rows);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor bilinear_upsample_crop_bwd_cuda(const at::Tensor& grad, int64_t factor, int64_t top, int64_t left,
                                           int64_t in_h, int64_t in_w) {
  TORCH_CHECK_VALUE(grad.dim() == 4, "grad must be N x C x H x W");
  TORCH_CHECK_VALUE(factor >= 1 && top >= 0 && left >= 0 && in_h >= 1 && in_w >= 1, "bad bilinear geometry");
  const c10::cuda::CUDAGuard guard(grad.device());
  const int64_t N = grad.size(0), C = grad.size(1), out_w = grad.size(3);
  at::Tensor dx = at::empty({N, C, in_h, in_w}, grad.options(), grad.suggest_memory_format());
  maybe_poison(dx);
  if (dx.numel() == 0) return dx;
  // The height pass first, over the full-resolution gradient: a thread's 2f taps are rows, so a warp's loads are
  // runs along a row. The width pass then works on the f-times smaller by_row, where its taps (columns, each
  // thread's f apart from its neighbour's) cost little. In the other order (until session 15) the width pass met
  // the full gradient: every warp load touched 32 sectors, 0.24 ms for FCN-32s's final layer at N = 8 on an H200.
  at::Tensor by_row = at::empty({N, C, in_h, out_w}, grad.options().dtype(acc_type_of(grad)));
  maybe_poison(by_row);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "bilinear_upsample_crop_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (bilinear_bwd_fits_32bit(grad, by_row, dx, factor) && !wide_index_forced()) {
      launch_bilinear_bwd<scalar_t, acc_t, int32_t, FastDiv32>(grad, by_row, dx, factor, top, left, stream);
    } else {
      launch_bilinear_bwd<scalar_t, acc_t, int64_t, PlainDiv64>(grad, by_row, dx, factor, top, left, stream);
    }
  });
  return dx;
}

at::Tensor upsample_crop_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              at::IntArrayRef stride, at::IntArrayRef crop, at::IntArrayRef out_size,
                              int64_t groups) {
  TORCH_CHECK_VALUE(out_size.size() == 2, "out_size must have two entries");
  const UpGeometry g = make_up_geometry(x, weight, stride, crop, out_size[0], out_size[1], groups);
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == g.cout && bias->device() == x.device() &&
                          bias->scalar_type() == x.scalar_type(),
                      "bias must be a vector of ", g.cout, " with x's dtype and device");
  }
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({g.n, g.cout, g.oh, g.ow}, x.options(), x.suggest_memory_format());
  maybe_poison(out);
  if (out.numel() == 0) return out;
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "upsample_crop_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    learned_fwd_kernel<scalar_t, acc_t><<<grid_for(out.numel()), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        x.const_data_ptr<scalar_t>(), strides_of(x), weight.const_data_ptr<scalar_t>(), strides_of(weight),
        b.defined() ? b.const_data_ptr<scalar_t>() : nullptr, out.mutable_data_ptr<scalar_t>(), strides_of(out), g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> upsample_crop_bwd_cuda(const at::Tensor& grad, const at::Tensor& x,
                                                                       const at::Tensor& weight,
                                                                       at::IntArrayRef stride, at::IntArrayRef crop,
                                                                       int64_t groups, std::array<bool, 3> mask) {
  TORCH_CHECK_VALUE(grad.dim() == 4, "grad must be N x Cout x H x W");
  const UpGeometry g = make_up_geometry(x, weight, stride, crop, grad.size(2), grad.size(3), groups);
  TORCH_CHECK_VALUE(grad.size(0) == g.n && grad.size(1) == g.cout, "grad ", grad.sizes(), " does not fit x ",
                    x.sizes(), " and weight ", weight.sizes());
  TORCH_CHECK_TYPE(grad.scalar_type() == x.scalar_type(), "grad must have x's dtype");
  TORCH_CHECK_VALUE(grad.device() == x.device(), "grad must be on x's device");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor empty = x.new_empty({0});
  at::Tensor dx = empty, dw = empty, db = empty;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "upsample_crop_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (mask[0]) {
      dx = at::empty(x.sizes(), x.options(), x.suggest_memory_format());
      maybe_poison(dx);
      if (dx.numel() > 0) {
        learned_dgrad_kernel<scalar_t, acc_t><<<grid_for(dx.numel()), kThreads, 0, stream>>>(
            grad.const_data_ptr<scalar_t>(), strides_of(grad), weight.const_data_ptr<scalar_t>(),
            strides_of(weight), dx.mutable_data_ptr<scalar_t>(), strides_of(dx), g);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
    if (mask[1]) {
      dw = at::empty(weight.sizes(), weight.options());  // contiguous: the kernel writes element e at dw[e]
      maybe_poison(dw);
      if (dw.numel() > 0) {
        learned_wgrad_kernel<scalar_t, acc_t><<<dw.numel(), kThreads, 0, stream>>>(
            grad.const_data_ptr<scalar_t>(), strides_of(grad), x.const_data_ptr<scalar_t>(), strides_of(x),
            dw.mutable_data_ptr<scalar_t>(), g);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
  });
  if (mask[2]) db = grad.sum({0, 2, 3}, false, acc_type_of(grad)).to(grad.scalar_type());
  return {dx, dw, db};
}

}  // namespace fcnkern
