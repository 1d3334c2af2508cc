// CPU kernels of the fused pixelwise softmax cross-entropy (see cross_entropy.h for the maths).
//
// Work is cut into tiles of up to kTile pixels of one image row (or of the whole H*W plane when it is dense).
// Each tile's C x kTile logits are gathered once from memory into an fp32 scratch buffer that stays in L1/L2;
// the max sweep and the exp-sum sweep then run over that buffer with pixels in the vector lanes. So memory is
// read once per pass even though the softmax needs two sweeps over the classes.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif


#include "cpu_math.h"
#include "common.h"
#include "cross_entropy.h"
#include "cross_entropy_tile.h"
#include "large_block_cache.h"

namespace fcnkern {
namespace {

using namespace ce_tile;

FCNK_MULTIVERSION int32_t fwd_tile(float* buf, int64_t C, const int64_t* labels, int64_t ignore_index,
                                   const float* weight, float* mx, float* lsum, float* loss, bool keep_exp) {
  return fwd_tile_dispatch<float, FloatMath>(buf, C, labels, ignore_index, weight, mx, lsum, loss, keep_exp);
}
int32_t fwd_tile(double* buf, int64_t C, const int64_t* labels, int64_t ignore_index, const double* weight,
                 double* mx, double* lsum, double* loss, bool keep_exp) {
  return fwd_tile_dispatch<double, DoubleMath>(buf, C, labels, ignore_index, weight, mx, lsum, loss, keep_exp);
}
FCNK_MULTIVERSION void fwd_grad_tile(float* buf, int64_t C, const int64_t* labels, int64_t ignore_index,
                                     const float* weight, const float* lsum) {
  if (weight) {
    grad_from_exp_math<float, FloatMath, true>(buf, C, labels, ignore_index, weight, lsum);
  } else {
    grad_from_exp_math<float, FloatMath, false>(buf, C, labels, ignore_index, weight, lsum);
  }
}
void fwd_grad_tile(double* buf, int64_t C, const int64_t* labels, int64_t ignore_index, const double* weight,
                   const double* lsum) {
  if (weight) {
    grad_from_exp_math<double, DoubleMath, true>(buf, C, labels, ignore_index, weight, lsum);
  } else {
    grad_from_exp_math<double, DoubleMath, false>(buf, C, labels, ignore_index, weight, lsum);
  }
}
FCNK_MULTIVERSION void bwd_tile(float* buf, int64_t C, const int64_t* labels, int64_t ignore_index,
                                const float* weight, const float* mx, const float* lsum, const float* grad_loss) {
  if (weight) {
    bwd_tile_math<float, FloatMath, true>(buf, C, labels, ignore_index, weight, mx, lsum, grad_loss);
  } else {
    bwd_tile_math<float, FloatMath, false>(buf, C, labels, ignore_index, weight, mx, lsum, grad_loss);
  }
}
void bwd_tile(double* buf, int64_t C, const int64_t* labels, int64_t ignore_index, const double* weight,
              const double* mx, const double* lsum, const double* grad_loss) {
  if (weight) {
    bwd_tile_math<double, DoubleMath, true>(buf, C, labels, ignore_index, weight, mx, lsum, grad_loss);
  } else {
    bwd_tile_math<double, DoubleMath, false>(buf, C, labels, ignore_index, weight, mx, lsum, grad_loss);
  }
}

// How the N*H*W pixels are cut into tiles. A row is W pixels, or the whole H*W plane when every per-pixel
// tensor involved has h-stride == W * w-stride (NCHW and channels_last do; a cropped view does not).
struct Tiling {
  int64_t rows_per_image, row_len, tiles_per_row;
  int64_t num_tiles(int64_t n) const { return n * rows_per_image * tiles_per_row; }
};

Tiling make_tiling(int64_t H, int64_t W, std::initializer_list<const at::Tensor*> pixel_tensors) {
  bool dense_plane = true;
  for (const at::Tensor* t : pixel_tensors) {
    const int64_t d = t->dim();
    // Size-1 dims have meaningless strides; only a real step between rows matters.
    if (H > 1 && t->stride(d - 2) != W * t->stride(d - 1)) dense_plane = false;
  }
  Tiling tl;
  tl.rows_per_image = dense_plane ? 1 : H;
  tl.row_len = dense_plane ? H * W : W;
  tl.tiles_per_row = (tl.row_len + kTile - 1) / kTile;
  return tl;
}

// Element offset of pixel (n, row, col) of a tensor whose last two dims are H x W. With a dense plane row is 0
// and col runs over all H*W pixels, which is right because then h-stride == W * w-stride.
inline int64_t pixel_offset(const at::Tensor& t, int64_t n, int64_t row, int64_t col) {
  const int64_t d = t.dim();
  return n * t.stride(0) + row * t.stride(d - 2) + col * t.stride(d - 1);
}

// Row conversions between the tensor's element type and the accumulation type.
template <typename scalar_t, typename acc_t>
inline void load_row(const scalar_t* src, int64_t step, int64_t len, acc_t* dst) {
  for (int64_t j = 0; j < len; ++j) dst[j] = static_cast<acc_t>(src[j * step]);
}
template <typename scalar_t, typename acc_t>
inline void store_row(const acc_t* src, int64_t len, scalar_t* dst, int64_t step) {
  for (int64_t j = 0; j < len; ++j) dst[j * step] = static_cast<scalar_t>(src[j]);
}

#if defined(__x86_64__) && defined(__GNUC__)
// fp16 rows convert with F16C, 8 lanes per instruction (vcvtph2ps / vcvtps2ph, round to nearest even like
// c10::Half), chosen at run time. c10::Half's portable conversion is bit manipulation per element: measured fp16
// fwd+bwd 89 ms vs 35 ms for bf16 at 8x21x512x512 before this. (GCC 12 does not vectorise _Float16 conversions.)
__attribute__((target("avx,f16c"))) void load_row_f16c(const c10::Half* src, int64_t len, float* dst) {
  int64_t j = 0;
  for (; j + 8 <= len; j += 8) {
    _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j))));
  }
  for (; j < len; ++j) dst[j] = static_cast<float>(src[j]);
}
__attribute__((target("avx,f16c"))) void store_row_f16c(const float* src, int64_t len, c10::Half* dst) {
  int64_t j = 0;
  for (; j + 8 <= len; j += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + j),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + j), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  for (; j < len; ++j) dst[j] = static_cast<c10::Half>(src[j]);
}
const bool kHasF16C = __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx");

inline void load_row(const c10::Half* src, int64_t step, int64_t len, float* dst) {
  if (step == 1 && kHasF16C) return load_row_f16c(src, len, dst);
  for (int64_t j = 0; j < len; ++j) dst[j] = static_cast<float>(src[j * step]);
}
inline void store_row(const float* src, int64_t len, c10::Half* dst, int64_t step) {
  if (step == 1 && kHasF16C) return store_row_f16c(src, len, dst);
  for (int64_t j = 0; j < len; ++j) dst[j * step] = static_cast<c10::Half>(src[j]);
}
#endif

template <typename scalar_t, typename acc_t>
void load_tile(const scalar_t* x, int64_t sC, int64_t sP, int64_t C, int64_t len, acc_t* buf) {
  for (int64_t c = 0; c < C; ++c) {
    acc_t* dst = buf + c * kTile;
    load_row(x + c * sC, sP, len, dst);
    // Padding lanes compute on harmless finite values and are never stored.
    for (int64_t j = len; j < kTile; ++j) dst[j] = 0;
  }
}

// Copies len per-pixel values at stride `step` into a kTile array, padding the rest with `pad`.
template <typename T>
inline void gather_pixels(const T* src, int64_t step, int64_t len, T pad, T* dst) {
  if (step == 1) {
    std::memcpy(dst, src, len * sizeof(T));
  } else {
    for (int64_t j = 0; j < len; ++j) dst[j] = src[j * step];
  }
  for (int64_t j = len; j < kTile; ++j) dst[j] = pad;
}

template <typename scalar_t, typename acc_t>
void store_tile(const acc_t* buf, int64_t C, int64_t len, scalar_t* y, int64_t sC, int64_t sP) {
  for (int64_t c = 0; c < C; ++c) store_row(buf + c * kTile, len, y + c * sC, sP);
}

template <typename F>
void for_each_tile(const Tiling& tl, int64_t N, int64_t C, F&& body) {
  const int64_t total = tl.num_tiles(N);
  // Aim for ~16K logits per task so that tiny images still split and large ones do not over-schedule.
  const int64_t grain = std::max<int64_t>(1, 16384 / (C * kTile));
  at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t tile = i % tl.tiles_per_row;
      const int64_t row = (i / tl.tiles_per_row) % tl.rows_per_image;
      const int64_t n = i / (tl.tiles_per_row * tl.rows_per_image);
      const int64_t col0 = tile * kTile;
      body(n, row, col0, std::min(kTile, tl.row_len - col0));
    }
  });
}


}  // namespace

namespace {

// The forward, and with `grad` also the gradient of every pixel's loss (upstream gradient 1): the tile is still
// in L1 after its softmax statistics are known, so the gradient costs one more sweep over it and one write.
std::tuple<at::Tensor, at::Tensor> forward_impl(const at::Tensor& logits, const at::Tensor& target,
                                                const std::optional<at::Tensor>& weight, int64_t ignore_index,
                                                at::Tensor* grad) {
  check_ce_args(logits, target, weight);
  const int64_t N = logits.size(0), C = logits.size(1), H = logits.size(2), W = logits.size(3);
  const auto acc = acc_type_of(logits);
  auto opts = logits.options().dtype(acc);
  at::Tensor loss = at::empty({N, H, W}, opts);
  at::Tensor stats = at::empty({2, N, H, W}, opts);
  maybe_poison(loss);
  maybe_poison(stats);
  if (grad != nullptr) {
    *grad = empty_like_large(logits);
    maybe_poison(*grad);
  }
  if (loss.numel() == 0 || C == 0) return {loss, stats};

  const at::Tensor& pixel_layout = grad != nullptr ? *grad : logits;
  const Tiling tl = make_tiling(H, W, {&logits, &target, &pixel_layout});
  const int64_t sC = logits.stride(1), sP = logits.stride(3), tP = target.stride(2);
  std::atomic<bool> bad{false};
  std::atomic<int64_t> bad_label{0};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "pixelwise_ce_fwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* x = logits.data_ptr<scalar_t>();
    const int64_t* t = target.data_ptr<int64_t>();
    const acc_t* w = weight.has_value() ? weight->data_ptr<acc_t>() : nullptr;
    acc_t* loss_p = loss.data_ptr<acc_t>();
    acc_t* mx_p = stats.data_ptr<acc_t>();
    acc_t* lsum_p = mx_p + N * H * W;
    scalar_t* gx = grad != nullptr ? grad->data_ptr<scalar_t>() : nullptr;
    for_each_tile(tl, N, C, [&](int64_t n, int64_t row, int64_t col0, int64_t len) {
      thread_local std::vector<acc_t> buf;
      buf.resize(C * kTile);
      int64_t labels[kTile];
      acc_t tile_mx[kTile], tile_lsum[kTile], tile_loss[kTile];
      gather_pixels(t + pixel_offset(target, n, row, col0), tP, len, ignore_index, labels);
      load_tile(x + pixel_offset(logits, n, row, col0), sC, sP, C, len, buf.data());
      if (fwd_tile(buf.data(), C, labels, ignore_index, w, tile_mx, tile_lsum, tile_loss, gx != nullptr)) {
        for (int64_t j = 0; j < len; ++j) {
          if (labels[j] != ignore_index && (labels[j] < 0 || labels[j] >= C)) bad_label.store(labels[j]);
        }
        bad.store(true);
      }
      // Outputs are contiguous N x H x W: the tile's pixels are consecutive there.
      const int64_t out0 = n * H * W + (tl.rows_per_image == 1 ? col0 : row * W + col0);
      std::memcpy(loss_p + out0, tile_loss, len * sizeof(acc_t));
      std::memcpy(mx_p + out0, tile_mx, len * sizeof(acc_t));
      std::memcpy(lsum_p + out0, tile_lsum, len * sizeof(acc_t));
      if (gx != nullptr) {
        fwd_grad_tile(buf.data(), C, labels, ignore_index, w, tile_lsum);
        store_tile(buf.data(), C, len, gx + pixel_offset(*grad, n, row, col0), grad->stride(1), grad->stride(3));
      }
    });
  });
  TORCH_CHECK_VALUE(!bad.load(), "target contains label ", bad_label.load(), ", outside [0, ", C,
                    ") and not ignore_index (", ignore_index, ")");
  return {loss, stats};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> pixelwise_ce_fwd_cpu(const at::Tensor& logits, const at::Tensor& target,
                                                        const std::optional<at::Tensor>& weight,
                                                        int64_t ignore_index) {
  return forward_impl(logits, target, weight, ignore_index, nullptr);
}

std::tuple<at::Tensor, at::Tensor> pixelwise_ce_fwd_grad_cpu(const at::Tensor& logits, const at::Tensor& target,
                                                             const std::optional<at::Tensor>& weight,
                                                             int64_t ignore_index) {
  at::Tensor grad;
  auto [loss, stats] = forward_impl(logits, target, weight, ignore_index, &grad);
  return {loss, grad};
}

at::Tensor pixelwise_ce_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                                const std::optional<at::Tensor>& weight, const at::Tensor& stats,
                                int64_t ignore_index) {
  check_ce_args(logits, target, weight);
  check_ce_bwd_args(grad_loss, logits, stats);
  const int64_t N = logits.size(0), C = logits.size(1), H = logits.size(2), W = logits.size(3);
  at::Tensor grad = empty_like_large(logits);
  maybe_poison(grad);
  if (grad.numel() == 0) return grad;

  const Tiling tl = make_tiling(H, W, {&logits, &target, &grad, &grad_loss});
  const int64_t sC = logits.stride(1), sP = logits.stride(3), tP = target.stride(2);
  const int64_t gC = grad.stride(1), gP = grad.stride(3), glP = grad_loss.stride(2);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "pixelwise_ce_bwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* x = logits.data_ptr<scalar_t>();
    const int64_t* t = target.data_ptr<int64_t>();
    const acc_t* w = weight.has_value() ? weight->data_ptr<acc_t>() : nullptr;
    const acc_t* gl = grad_loss.data_ptr<acc_t>();
    const acc_t* mx_p = stats.data_ptr<acc_t>();
    const acc_t* lsum_p = mx_p + N * H * W;
    scalar_t* gx = grad.data_ptr<scalar_t>();
    for_each_tile(tl, N, C, [&](int64_t n, int64_t row, int64_t col0, int64_t len) {
      thread_local std::vector<acc_t> buf;
      buf.resize(C * kTile);
      int64_t labels[kTile];
      acc_t tile_mx[kTile], tile_lsum[kTile], tile_gl[kTile];
      const int64_t out0 = n * H * W + (tl.rows_per_image == 1 ? col0 : row * W + col0);
      gather_pixels(t + pixel_offset(target, n, row, col0), tP, len, ignore_index, labels);
      gather_pixels(gl + pixel_offset(grad_loss, n, row, col0), glP, len, acc_t(0), tile_gl);
      gather_pixels(mx_p + out0, int64_t(1), len, acc_t(0), tile_mx);
      gather_pixels(lsum_p + out0, int64_t(1), len, acc_t(0), tile_lsum);
      load_tile(x + pixel_offset(logits, n, row, col0), sC, sP, C, len, buf.data());
      bwd_tile(buf.data(), C, labels, ignore_index, w, tile_mx, tile_lsum, tile_gl);
      store_tile(buf.data(), C, len, gx + pixel_offset(grad, n, row, col0), gC, gP);
    });
  });
  return grad;
}

}  // namespace fcnkern
