// CUDA kernels of the fused Conv2d + ReLU (fcnkern.conv2d_relu): implicit GEMMs, forward and backward.
//
// One tiled GEMM core (gather_gemm) serves three problems, each of which says how to gather its operands straight
// from the tensors through their strides (nothing is im2col'ed in memory) and where its results go:
//
//   forward  y[(n, oh, ow), k]  = sum over j = (c, r, s) of x[n, c, oh*sh - ph + r*dh, ...] * w[k, j],
//            then + bias and ReLU in the epilogue, stored in y's dtype and memory format;
//   dgrad    dx[(n, ih, iw), c] = sum over (k, r, s) of dy'[n, k, oh, ow] * w[k, c, r, s] for the (oh, ow) that
//            tap (ih, iw) through (r, s), where dy' = dy * (y > 0) is formed while loading: the masked gradient is
//            never written;
//   wgrad    dw[k, j] = sum over pixels of dy'[pixel, k] * x_col[pixel, j], the pixel reduction split over
//            blockIdx.z into an fp32 workspace that is summed afterwards (deterministic, no atomics).
//
// Each block computes a 64 x 64 tile over 32-deep slices of the reduction staged in shared memory. fp16/bf16 run on
// tensor cores through WMMA (16 x 16 x 16 fragments, fp32 accumulation; 4 warps of 2 x 2 fragments), fp32 and fp64
// on CUDA cores (each thread a 4 x 8 register tile): fp32 results are fp32-exact, as PyTorch's default is for convs
// (no TF32). The bias gradient is a separate deterministic reduction over dy * (y > 0).
//
// Design after CUTLASS's implicit-GEMM documentation (operand iterators that compute gather addresses per tile);
// the code is our own and deliberately simple (no multistage pipeline yet): correctness first, then measurement on
// a GPU (issue 7).
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <torch/extension.h>

#include <array>
#include <type_traits>

#include "common.h"
#include "conv_relu.h"
#include "conv_relu_problems.h"

namespace fcnkern {
namespace {

constexpr int kBM = 64, kBN = 64, kBK = 32, kThreads = 128, kPad = 8;

using namespace conv_gemm;

template <typename T>
constexpr bool kTensorCores = std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>;

// The GEMM core. Operand tiles are staged in shared memory as [kBK][kBM] and [kBK][kBN] (reduction-major), filled
// with the index order that makes each problem's global loads coalesced (kAFastM, kBFastN).
template <typename P>
__global__ void __launch_bounds__(kThreads) gather_gemm(P problem) {
  using T = typename P::scalar_t;
  using acc_t = acc_of<T>;
  using smem_t = std::conditional_t<kTensorCores<T>, T, acc_t>;
  __shared__ __align__(32) smem_t As[kBK][kBM + kPad];
  __shared__ __align__(32) smem_t Bs[kBK][kBN + kPad];
  P p = problem;
  p.begin(blockIdx.z);
  const int64_t m0 = int64_t(blockIdx.x) * kBM, n0 = int64_t(blockIdx.y) * kBN;
  const int64_t rows = p.rows(), cols = p.cols();
  const int tid = threadIdx.x;

  // CUDA-core accumulators: thread (ty, tx) owns rows ty*4 .. +3 and columns tx*8 .. +7 of the tile.
  acc_t acc[4][8] = {};
  const int ty = tid / 8, tx = tid % 8;
  // Tensor-core accumulators: warp wid owns the 32 x 32 quarter (wid / 2, wid % 2), as 2 x 2 fragments.
  using namespace nvcuda;
  using frag_t = std::conditional_t<kTensorCores<T>, T, __half>;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> c_frag[2][2];
  const int wid = tid / 32, wm = (wid / 2) * 32, wn = (wid % 2) * 32;
  if constexpr (kTensorCores<T>) {
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(c_frag[i][j], 0.0f);
  }

  for (int64_t k0 = p.k_begin; k0 < p.k_end; k0 += kBK) {
    for (int idx = tid; idx < kBK * kBM; idx += kThreads) {
      const int kk = P::kAFastM ? idx / kBM : idx % kBK, mm = P::kAFastM ? idx % kBM : idx / kBK;
      const int64_t m = m0 + mm, k = k0 + kk;
      As[kk][mm] = from_acc<smem_t>(m < rows && k < p.k_end ? p.a(m, k) : acc_t(0));
    }
    for (int idx = tid; idx < kBK * kBN; idx += kThreads) {
      const int kk = P::kBFastN ? idx / kBN : idx % kBK, nn = P::kBFastN ? idx % kBN : idx / kBK;
      const int64_t n = n0 + nn, k = k0 + kk;
      Bs[kk][nn] = from_acc<smem_t>(n < cols && k < p.k_end ? p.b(k, n) : acc_t(0));
    }
    __syncthreads();
    if constexpr (kTensorCores<T>) {
      for (int kk = 0; kk < kBK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, frag_t, wmma::col_major> a_frag[2];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, frag_t, wmma::row_major> b_frag[2];
        for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a_frag[i], &As[kk][wm + 16 * i], kBM + kPad);
        for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b_frag[j], &Bs[kk][wn + 16 * j], kBN + kPad);
        for (int i = 0; i < 2; ++i)
          for (int j = 0; j < 2; ++j) wmma::mma_sync(c_frag[i][j], a_frag[i], b_frag[j], c_frag[i][j]);
      }
    } else {
#pragma unroll 4
      for (int kk = 0; kk < kBK; ++kk) {
        acc_t av[4], bv[8];
        for (int i = 0; i < 4; ++i) av[i] = As[kk][ty * 4 + i];
        for (int j = 0; j < 8; ++j) bv[j] = Bs[kk][tx * 8 + j];
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < 8; ++j) acc[i][j] += av[i] * bv[j];
      }
    }
    __syncthreads();
  }

  if constexpr (kTensorCores<T>) {
    // Through shared memory, so that the stores can follow the destination's fast index.
    __shared__ __align__(32) float Cs[kBM][kBN + 4];
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(&Cs[wm + 16 * i][wn + 16 * j], c_frag[i][j], kBN + 4, wmma::mem_row_major);
    __syncthreads();
    for (int idx = tid; idx < kBM * kBN; idx += kThreads) {
      const int mm = P::kStoreFastM ? idx % kBM : idx / kBN, nn = P::kStoreFastM ? idx / kBM : idx % kBN;
      if (m0 + mm < rows && n0 + nn < cols) p.store(m0 + mm, n0 + nn, Cs[mm][nn]);
    }
  } else {
    for (int i = 0; i < 4; ++i) {
      for (int j = 0; j < 8; ++j) {
        const int64_t m = m0 + ty * 4 + i, n = n0 + tx * 8 + j;
        if (m < rows && n < cols) p.store(m, n, acc[i][j]);
      }
    }
  }
}

// db[k] = sum over pixels of dy * (y > 0): one block per output channel, a fixed per-thread stride and a fixed
// shared-memory tree, so the sum is the same every run.
template <typename T>
__global__ void __launch_bounds__(256) bias_grad_kernel(const T* dy, Strides dys, const T* y, Strides ys, bool relu,
                                                         Shape s, acc_of<T>* db) {
  __shared__ acc_of<T> part[256];
  const int64_t k = blockIdx.x, pixels = s.n * s.oh * s.ow;
  acc_of<T> sum = 0;
  for (int64_t p = threadIdx.x; p < pixels; p += blockDim.x) {
    const int64_t ow = p % s.ow, oh = (p / s.ow) % s.oh, n = p / (s.ow * s.oh);
    sum += masked_grad(dy, dys, y, ys, relu, n, k, oh, ow);
  }
  part[threadIdx.x] = sum;
  __syncthreads();
  for (int step = 128; step > 0; step >>= 1) {
    if (threadIdx.x < step) part[threadIdx.x] += part[threadIdx.x + step];
    __syncthreads();
  }
  if (threadIdx.x == 0) db[k] = part[0];
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename P>
void launch_gemm(const P& p, int64_t rows, int64_t cols, int64_t z) {
  TORCH_CHECK_VALUE(cdiv(cols, kBN) < 65536 && z < 65536, "convolution too large for one launch");
  const dim3 grid(static_cast<unsigned>(cdiv(rows, kBM)), static_cast<unsigned>(cdiv(cols, kBN)),
                  static_cast<unsigned>(z));
  gather_gemm<P><<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
const T* ptr(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.data_ptr());
}
template <typename T>
T* mut_ptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

at::Tensor conv2d_relu_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                            int64_t groups, bool relu) {
  const ConvGeometry g = make_geometry(x, weight, stride, padding, dilation, groups);
  check_args(x, weight, g);
  check_bias(bias, x, g);
  const at::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty({g.n, g.k, g.oh, g.ow}, x.options().memory_format(x.suggest_memory_format()));
  maybe_poison(y);
  if (y.numel() == 0) return y;
  const at::Tensor w = weight.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv2d_relu_cuda", [&] {
    using T = typename Native<scalar_t>::type;
    Forward<T> p{make_shape(g), ptr<T>(x), ptr<T>(w), b.defined() ? ptr<T>(b) : nullptr, mut_ptr<T>(y),
                 strides_of(x), strides_of(y), relu};
    launch_gemm(p, g.n * g.oh * g.ow, g.k_g, g.groups);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_relu_bwd_cuda(const at::Tensor& grad, const at::Tensor& y,
                                                                    const at::Tensor& x, const at::Tensor& weight,
                                                                    at::IntArrayRef stride, at::IntArrayRef padding,
                                                                    at::IntArrayRef dilation, int64_t groups,
                                                                    bool relu, std::array<bool, 3> output_mask) {
  const ConvGeometry g = make_geometry(x, weight, stride, padding, dilation, groups);
  check_args(x, weight, g);
  check_bwd_args(grad, y, x, g);
  const at::cuda::CUDAGuard guard(x.device());
  const auto [need_x, need_w, need_b] = output_mask;
  const auto acc = acc_type_of(x);
  at::Tensor dx = at::empty({0}, x.options()), dw = at::empty({0}, x.options()), db = at::empty({0}, x.options());
  const at::Tensor w = weight.contiguous();
  const int64_t pixels = g.n * g.oh * g.ow;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv2d_relu_bwd_cuda", [&] {
    using T = typename Native<scalar_t>::type;
    if (need_x) {
      dx = at::empty(x.sizes(), x.options().memory_format(x.suggest_memory_format()));
      maybe_poison(dx);
      if (dx.numel() > 0) {
        Dgrad<T> p{make_shape(g), ptr<T>(grad), ptr<T>(y), ptr<T>(w), mut_ptr<T>(dx),
                   strides_of(grad), strides_of(y), strides_of(dx), relu};
        launch_gemm(p, g.n * g.h * g.w, g.c_g, g.groups);
      }
    }
    if (need_w) {
      // Enough splits of the pixel reduction to give ~2 blocks per SM, each at least 8 reduction steps deep.
      const int64_t tiles = cdiv(g.k_g, kBM) * cdiv(g.j, kBN) * g.groups;
      const int64_t splits = std::max<int64_t>(1, std::min(cdiv(264, tiles), cdiv(pixels, 8 * kBK)));
      const int64_t chunk = wgrad_chunk(pixels, splits, kBK);
      at::Tensor ws = at::zeros({splits, g.k, g.j}, x.options().dtype(acc));
      if (pixels > 0) {
        Wgrad<T> p{make_shape(g), ptr<T>(grad), ptr<T>(y), ptr<T>(x), mut_ptr<acc_of<T>>(ws),
                   strides_of(grad), strides_of(y), strides_of(x), relu, g.groups, chunk};
        launch_gemm(p, g.k_g, g.j, g.groups * splits);
      }
      dw = ws.sum(0).reshape(weight.sizes()).to(weight.scalar_type());
    }
    if (need_b) {
      at::Tensor db_acc = at::zeros({g.k}, x.options().dtype(acc));
      if (pixels > 0) {
        bias_grad_kernel<T><<<static_cast<unsigned>(g.k), 256, 0, at::cuda::getCurrentCUDAStream()>>>(
            ptr<T>(grad), strides_of(grad), ptr<T>(y), strides_of(y), relu, make_shape(g),
            mut_ptr<acc_of<T>>(db_acc));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      db = db_acc.to(x.scalar_type());
    }
  });
  return {dx, dw, db};
}

}  // namespace
}  // namespace fcnkern

TORCH_LIBRARY_IMPL(fcnkern, CUDA, m) {
  m.impl("conv2d_relu", &fcnkern::conv2d_relu_cuda);
  m.impl("conv2d_relu_bwd", &fcnkern::conv2d_relu_bwd_cuda);
}
