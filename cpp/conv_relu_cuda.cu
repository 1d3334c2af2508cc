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
// Design after CUTLASS's implicit-GEMM documentation (operand iterators whose gather addresses split into a row part
// and a column part, each computed once per tile); the code is our own: one shared-memory stage and no cp.async
// pipeline (the gathers convert and mask on load), latency hidden by several blocks per SM.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <array>
#include <type_traits>

#include "common.h"
#include "cuda_ops.h"
#include "conv_relu.h"
#include "conv_relu_problems.h"

namespace fcnkern {
namespace {

constexpr int kBM = 64, kBN = 64, kBK = 32, kThreads = 128, kPad = 8;

using namespace conv_gemm;

template <typename T>
constexpr bool kTensorCores = std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>;

// Element i of a thread's share of a kBK x R operand tile: its (reduction, row) slot, in the index order that makes
// the operand's global loads coalesced (rows fastest when kFastRows). The gathers' loads and stores walk the same
// slots.
struct TileSlot {
  unsigned k, r;
};
template <bool kFastRows, unsigned R>
__device__ __forceinline__ TileSlot tile_slot(int tid, int i) {
  const unsigned idx = tid + i * kThreads;
  return kFastRows ? TileSlot{idx / R, idx % R} : TileSlot{idx % kBK, idx / kBK};
}

// The GEMM core. Operand tiles are staged in shared memory as [kBK][kBM] and [kBK][kBN] (reduction-major), filled
// with the index order that makes each problem's global loads coalesced (kAFastM, kBFastN). The problem's row and
// column contexts (see conv_relu_problems.h) sit in shared memory: the block's rows once, each slice's reduction
// columns as it comes (double-buffered, so that the next slice's are computed beside this slice's gather).
template <typename P>
__global__ void __launch_bounds__(kThreads) gather_gemm(P problem) {
  using T = typename P::scalar_t;
  using acc_t = acc_of<T>;
  using smem_t = std::conditional_t<kTensorCores<T>, T, acc_t>;
  constexpr int kAPerThread = kBK * kBM / kThreads, kBPerThread = kBK * kBN / kThreads;
  __shared__ __align__(32) smem_t As[kBK][kBM + kPad];
  __shared__ __align__(32) smem_t Bs[kBK][kBN + kPad];
  __shared__ typename P::AM a_rows[kBM];
  __shared__ typename P::BN b_cols[kBN];
  __shared__ typename P::AK a_ks[2][kBK];
  __shared__ typename P::BK b_ks[2][kBK];
  P p = problem;
  p.begin(blockIdx.z);
  const int64_t m0 = int64_t(blockIdx.x) * kBM, n0 = int64_t(blockIdx.y) * kBN;
  const int64_t rows = p.rows(), cols = p.cols();
  const int tid = threadIdx.x;
  // The tile's rows and columns inside the GEMM, as 32-bit bounds for the per-element tests.
  const unsigned m_in = static_cast<unsigned>(imin(rows - m0, kBM)), n_in = static_cast<unsigned>(imin(cols - n0, kBN));

  for (int i = tid; i < kBM; i += kThreads)
    if (m0 + i < rows) a_rows[i] = p.a_m(m0 + i);
  for (int i = tid; i < kBN; i += kThreads)
    if (n0 + i < cols) b_cols[i] = p.b_n(n0 + i);
  // The reduction columns of the slice at k0 into buffer `buf`: threads 0..kBK-1 for A, the next kBK for B.
  const auto fill_columns = [&](int64_t k0, int buf) {
    const int64_t k = k0 + tid % kBK;
    if (k >= p.k_end) return;
    if (tid < kBK) {
      a_ks[buf][tid] = p.a_k(k);
    } else if (tid < 2 * kBK) {
      b_ks[buf][tid - kBK] = p.b_k(k);
    }
  };
  // The slice at k0 into As / Bs, elements through the contexts in buffer `buf`. All loads first (they are
  // unconditional, see gather_x), then the shared-memory stores: a thread's 16 loads per operand are in flight
  // together instead of one after another.
  const auto gather = [&](int64_t k0, int buf) {
    const unsigned k_in = static_cast<unsigned>(imin(p.k_end - k0, kBK));
    acc_t v[kAPerThread > kBPerThread ? kAPerThread : kBPerThread];
#pragma unroll
    for (int i = 0; i < kAPerThread; ++i) {
      const TileSlot e = tile_slot<P::kAFastM, kBM>(tid, i);
      v[i] = p.a(a_rows[e.r], a_ks[buf][e.k], e.r < m_in && e.k < k_in);
    }
#pragma unroll
    for (int i = 0; i < kAPerThread; ++i) {
      const TileSlot e = tile_slot<P::kAFastM, kBM>(tid, i);
      As[e.k][e.r] = from_acc<smem_t>(v[i]);
    }
#pragma unroll
    for (int i = 0; i < kBPerThread; ++i) {
      const TileSlot e = tile_slot<P::kBFastN, kBN>(tid, i);
      v[i] = p.b(b_ks[buf][e.k], b_cols[e.r], e.r < n_in && e.k < k_in);
    }
#pragma unroll
    for (int i = 0; i < kBPerThread; ++i) {
      const TileSlot e = tile_slot<P::kBFastN, kBN>(tid, i);
      Bs[e.k][e.r] = from_acc<smem_t>(v[i]);
    }
  };

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

  fill_columns(p.k_begin, 0);
  __syncthreads();
  int buf = 0;
  for (int64_t k0 = p.k_begin; k0 < p.k_end; k0 += kBK, buf ^= 1) {
    gather(k0, buf);
    // The other buffer was last read by the previous slice's gather, before the barriers since.
    if (k0 + kBK < p.k_end) fill_columns(k0 + kBK, buf ^ 1);
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
      if (m0 + mm < rows && n0 + nn < cols) p.store(a_rows[mm], m0 + mm, n0 + nn, Cs[mm][nn]);
    }
  } else {
    for (int i = 0; i < 4; ++i) {
      for (int j = 0; j < 8; ++j) {
        const int mm = ty * 4 + i;
        const int64_t m = m0 + mm, n = n0 + tx * 8 + j;
        if (m < rows && n < cols) p.store(a_rows[mm], m, n, acc[i][j]);
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
    sum += masked_grad(dy, y, relu, GradOffsets{k * dys.c, k * ys.c}, grad_offsets(out_pixel(s, p), dys, ys));
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

void check_coordinates(const ConvGeometry& g) {
  TORCH_CHECK_VALUE(coordinates_fit_int32(make_shape(g)),
                    "conv2d_relu (cuda backend): spatial sizes, padding and dilation reach beyond 2^31 positions, "
                    "more than its 32-bit coordinates hold; use another backend");
}

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

}  // namespace

at::Tensor conv2d_relu_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                            int64_t groups, bool relu) {
  const ConvGeometry g = make_geometry(x, weight, stride, padding, dilation, groups);
  check_args(x, weight, g);
  check_bias(bias, x, g);
  check_coordinates(g);
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
  check_coordinates(g);
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
      // An empty output (an input smaller than the dilated kernel) taps nothing: dx is 0. The gathers read
      // element 0 of dy unconditionally, which an empty dy does not have.
      if (dx.numel() > 0 && grad.numel() == 0) dx.zero_();
      if (dx.numel() > 0 && grad.numel() > 0) {
        const auto launch = [&](auto strided) {
          Dgrad<T, decltype(strided)::value> p{make_shape(g), ptr<T>(grad), ptr<T>(y), ptr<T>(w), mut_ptr<T>(dx),
                                                strides_of(grad), strides_of(y), strides_of(dx), relu};
          launch_gemm(p, g.n * g.h * g.w, g.c_g, g.groups);
        };
        if (g.stride_h == 1 && g.stride_w == 1) {
          launch(std::false_type{});
        } else {
          launch(std::true_type{});
        }
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

}  // namespace fcnkern
