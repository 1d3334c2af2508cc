// CPU kernels of learned transposed-convolution upsampling with the crop folded in (fcnkern.upsample_crop).
//
// Forward, by output cell: the kept outputs whose full-output coordinates share (Y / sh, X / sw) = (qy, qx) form a
// cell of sh x sw pixels that all read the same th x tw input taps x[:, qy - t, qx - u]. So each task (an image, a
// group, a block of cell rows and of output channels) is one GEMM, product[cell, (co, py, px)] = sum over
// (ci, t, u) of x[ci, qy - t, qx - u] * w[ci, co, py + t sh, px + u sw], and its kept pixels are copied out row by
// row (runs of sw columns). Each output element is written by exactly one task: no atomics, no races.
//
// Backward: dcols[(co, ky, kx), (i, j)] = dy[co, i sh + ky - top, j sw + kx - left] (0 outside the kept window) is
// the gradient seen by every (input pixel, tap) pair. It is gathered once per block of input pixels and feeds both
// GEMMs: dx = W dcols (W as Cin_g x Cout_g kh kw) and dW += X dcols^T (per-thread accumulators, summed in thread
// order). The full uncropped output, or its gradient, never exists in memory.
//
// Any strides (NCHW, channels_last, views); fp16/bf16 converted to fp32 at the gathers and the stores.
#include <ATen/Dispatch.h>
#include <torch/extension.h>

#include <algorithm>
#include <vector>

#include "common.h"
#include "cpu_tasks.h"
#include "upsample.h"

namespace fcnkern {

UpGeometry make_up_geometry(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                            at::IntArrayRef crop, int64_t out_h, int64_t out_w, int64_t groups) {
  TORCH_CHECK_VALUE(x.dim() == 4 && weight.dim() == 4, "x and weight must be 4-d");
  TORCH_CHECK_VALUE(stride.size() == 2 && crop.size() == 2, "stride and crop must have two entries each");
  TORCH_CHECK_TYPE(x.scalar_type() == weight.scalar_type(), "x and weight must have one dtype");
  TORCH_CHECK_VALUE(x.device() == weight.device(), "x and weight must be on one device");
  UpGeometry g{};
  g.n = x.size(0), g.cin = x.size(1), g.h = x.size(2), g.w = x.size(3);
  g.groups = groups, g.cin_g = groups >= 1 ? g.cin / groups : 0, g.cout_g = weight.size(1);
  g.cout = g.cout_g * groups, g.kh = weight.size(2), g.kw = weight.size(3);
  g.sh = stride[0], g.sw = stride[1], g.top = crop[0], g.left = crop[1], g.oh = out_h, g.ow = out_w;
  TORCH_CHECK_VALUE(groups >= 1 && g.cin % groups == 0 && weight.size(0) == g.cin,
                    "weight ", weight.sizes(), " with groups=", groups, " does not fit ", g.cin, " input channels");
  TORCH_CHECK_VALUE(g.sh >= 1 && g.sw >= 1, "stride must be >= 1");
  TORCH_CHECK_VALUE(g.top >= 0 && g.left >= 0 && g.oh >= 1 && g.ow >= 1, "bad crop window");
  TORCH_CHECK_VALUE(g.top + g.oh <= (g.h - 1) * g.sh + g.kh && g.left + g.ow <= (g.w - 1) * g.sw + g.kw,
                    "crop window outside the upsampled output");
  return g;
}

namespace {

// The v in [0, count) for which offset + v * step lies in [0, len): returned as [lo, hi).
inline std::pair<int64_t, int64_t> inside(int64_t offset, int64_t step, int64_t len, int64_t count) {
  const int64_t lo = offset >= 0 ? 0 : (-offset + step - 1) / step;
  const int64_t hi = offset > len - 1 ? 0 : (len - 1 - offset) / step + 1;
  return {std::min(lo, count), std::clamp(hi, std::min(lo, count), count)};
}

// Where a gather reads: dst[((c * A + a) * B + b) * U * V + u * V + v] =
// src[c, r0 + u su + a ta, c0 + v sv + b tb] for u in [0, U), v in [0, V); 0 outside the H x W plane.
struct Taps {
  int64_t A, B, r0, su, ta, c0, sv, tb;
};

template <typename scalar_t, typename acc_t>
void gather(const scalar_t* src, int64_t s_c, int64_t s_h, int64_t s_w, int64_t C, int64_t H, int64_t W,
            const Taps& t, int64_t U, int64_t V, acc_t* dst) {
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t a = 0; a < t.A; ++a) {
      for (int64_t b = 0; b < t.B; ++b) {
        acc_t* out = dst + ((c * t.A + a) * t.B + b) * U * V;
        const int64_t col0 = t.c0 + b * t.tb;
        const auto [lo, hi] = inside(col0, t.sv, W, V);
        for (int64_t u = 0; u < U; ++u, out += V) {
          const int64_t row = t.r0 + u * t.su + a * t.ta;
          if (row < 0 || row >= H) {
            std::fill(out, out + V, acc_t(0));
            continue;
          }
          const scalar_t* in = src + c * s_c + row * s_h + col0 * s_w;
          std::fill(out, out + lo, acc_t(0));
          for (int64_t v = lo; v < hi; ++v) out[v] = static_cast<acc_t>(in[v * t.sv * s_w]);
          std::fill(out + hi, out + V, acc_t(0));
        }
      }
    }
  }
}

// Budget of a task's gathered block or product, in bytes: most of a 2 MiB L2, as in the conv kernels.
constexpr int64_t kBlockBytes = 1536 << 10;

template <typename scalar_t, typename acc_t>
void forward_impl(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const at::Tensor& out, const UpGeometry& g) {
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t th = (g.kh + g.sh - 1) / g.sh, tw = (g.kw + g.sw - 1) / g.sw, depth = g.cin_g * th * tw;
  const int64_t phases = g.sh * g.sw;
  // Cells: the full output's sh x sw squares (Y / sh, X / sw) that the kept window touches.
  const int64_t qy0 = g.top / g.sh, qx0 = g.left / g.sw;
  const int64_t cell_rows = (g.top + g.oh - 1) / g.sh - qy0 + 1, cell_cols = (g.left + g.ow - 1) / g.sw - qx0 + 1;
  // Output channels per task so that its product (cells x channels' phases) stays within budget, then cell rows.
  const int64_t row_bytes = cell_cols * phases * int64_t(sizeof(acc_t));
  const int64_t ch_per_block = std::clamp<int64_t>(kBlockBytes / std::max<int64_t>(row_bytes, 1), 1, g.cout_g);
  const int64_t ch_blocks = (g.cout_g + ch_per_block - 1) / ch_per_block;
  const int64_t rows_per_block = std::clamp<int64_t>(
      kBlockBytes / std::max<int64_t>(row_bytes * ch_per_block, 1), 1, cell_rows);
  const int64_t row_blocks = (cell_rows + rows_per_block - 1) / rows_per_block;
  // The weight by (group, channel block) as depth x (channels x sh x sw), dense: a[(ci, t, u), (co, py, px)] =
  // w[ci, co, py + t sh, px + u sw], 0 past the kernel (a zero tap times an infinite input gives NaN where
  // conv_transpose2d skips the tap; only kernels that are not a multiple of the stride have such taps).
  const at::Tensor w_acc = weight.to(acc).contiguous();
  const acc_t* wp = w_acc.const_data_ptr<acc_t>();
  std::vector<at::Tensor> a_blocks(g.groups * ch_blocks);
  for (int64_t group = 0; group < g.groups; ++group) {
    for (int64_t cb = 0; cb < ch_blocks; ++cb) {
      const int64_t co0 = cb * ch_per_block, chans = std::min(ch_per_block, g.cout_g - co0), cols = chans * phases;
      at::Tensor a = at::zeros({depth, cols}, w_acc.options());
      acc_t* ap = a.mutable_data_ptr<acc_t>();
      for (int64_t ci = 0; ci < g.cin_g; ++ci) {
        for (int64_t t = 0; t < th; ++t) {
          for (int64_t u = 0; u < tw; ++u) {
            acc_t* row = ap + ((ci * th + t) * tw + u) * cols;
            for (int64_t co = 0; co < chans; ++co) {
              const acc_t* w = wp + ((group * g.cin_g + ci) * g.cout_g + co0 + co) * g.kh * g.kw;
              for (int64_t py = 0; py < g.sh && py + t * g.sh < g.kh; ++py) {
                for (int64_t px = 0; px < g.sw && px + u * g.sw < g.kw; ++px) {
                  row[(co * g.sh + py) * g.sw + px] = w[(py + t * g.sh) * g.kw + px + u * g.sw];
                }
              }
            }
          }
        }
      }
      a_blocks[group * ch_blocks + cb] = a;
    }
  }
  at::Tensor bias_acc = bias.has_value() ? bias->to(acc).contiguous() : at::Tensor();
  const acc_t* bp = bias_acc.defined() ? bias_acc.const_data_ptr<acc_t>() : nullptr;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const int64_t xs[4] = {x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
  const int64_t os[4] = {out.stride(0), out.stride(1), out.stride(2), out.stride(3)};
  const int64_t tasks = g.n * g.groups * row_blocks * ch_blocks;
  run_tasks(tasks, spread_tasks(tasks), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> taps, product;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t cb = task % ch_blocks, rb = (task / ch_blocks) % row_blocks;
      const int64_t group = (task / (ch_blocks * row_blocks)) % g.groups;
      const int64_t n = task / (ch_blocks * row_blocks * g.groups);
      const int64_t r0 = rb * rows_per_block, rows = std::min(rows_per_block, cell_rows - r0);
      const int64_t cells = rows * cell_cols, co0 = cb * ch_per_block;
      const at::Tensor& a = a_blocks[group * ch_blocks + cb];
      const int64_t cols = a.size(1);
      // taps[(r, qx), (ci, t, u)] = x[n, ci, qy - t, qx - u], 0 outside the input.
      taps.resize(cells * depth);
      const scalar_t* xg = xp + n * xs[0] + group * g.cin_g * xs[1];
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t qx = 0; qx < cell_cols; ++qx) {
          acc_t* dst = taps.data() + (r * cell_cols + qx) * depth;
          for (int64_t ci = 0; ci < g.cin_g; ++ci) {
            for (int64_t t = 0; t < th; ++t) {
              const int64_t i = qy0 + r0 + r - t;
              for (int64_t u = 0; u < tw; ++u, ++dst) {
                const int64_t j = qx0 + qx - u;
                *dst = i >= 0 && i < g.h && j >= 0 && j < g.w ? static_cast<acc_t>(xg[ci * xs[1] + i * xs[2] + j * xs[3]])
                                                              : acc_t(0);
              }
            }
          }
        }
      }
      product.resize(cells * cols);
      mm_into(matrix(product.data(), cells, cols, acc), matrix(taps.data(), cells, depth, acc), a, true);
      // Each kept pixel from its cell's row of the product; a run of sw columns per cell, cells side by side.
      for (int64_t co = 0; co < cols / phases; ++co) {
        const int64_t c = group * g.cout_g + co0 + co;
        const acc_t add = bp != nullptr ? bp[c] : acc_t(0);
        for (int64_t r = 0; r < rows; ++r) {
          for (int64_t py = 0; py < g.sh; ++py) {
            const int64_t oy = (qy0 + r0 + r) * g.sh + py - g.top;
            if (oy < 0 || oy >= g.oh) continue;
            scalar_t* orow = op + n * os[0] + c * os[1] + oy * os[2];
            const acc_t* src = product.data() + r * cell_cols * cols + (co * g.sh + py) * g.sw;
            for (int64_t qx = 0; qx < cell_cols; ++qx, src += cols) {
              const int64_t ox0 = (qx0 + qx) * g.sw - g.left;
              const int64_t lo = std::max<int64_t>(0, -ox0), hi = std::min<int64_t>(g.sw, g.ow - ox0);
              for (int64_t px = lo; px < hi; ++px) orow[(ox0 + px) * os[3]] = static_cast<scalar_t>(src[px] + add);
            }
          }
        }
      }
    }
  });
}

// Fills dx (x's dtype and layout) if need_x; returns dW as Cin x (Cout_g kh kw) in acc_t if need_w.
template <typename scalar_t, typename acc_t>
at::Tensor backward_impl(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, const UpGeometry& g,
                         const at::Tensor& dx, bool need_x, bool need_w) {
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t jd = g.cout_g * g.kh * g.kw;  // dcols rows: (co, ky, kx)
  const at::Tensor w_acc = weight.to(acc).contiguous().view({g.cin, jd});
  const scalar_t* gp = grad.const_data_ptr<scalar_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const int64_t gs[4] = {grad.stride(0), grad.stride(1), grad.stride(2), grad.stride(3)};
  const int64_t xs[4] = {x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
  const int64_t rows_per_block =
      std::clamp<int64_t>(kBlockBytes / std::max<int64_t>(jd * g.w * int64_t(sizeof(acc_t)), 1), 1, g.h);
  const int64_t blocks = (g.h + rows_per_block - 1) / rows_per_block;
  const int64_t tasks = g.n * g.groups * blocks;
  const bool spread = spread_tasks(tasks);
  const at::Tensor dw_parts = at::zeros({need_w ? (spread ? at::get_num_threads() : 1) : 0, g.cin, jd},
                                        x.options().dtype(acc));
  run_tasks(tasks, spread, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> dcols, xcols, dx_block;
    const int64_t part = spread ? at::get_thread_num() : 0;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t block = task % blocks, group = (task / blocks) % g.groups, n = task / (blocks * g.groups);
      const int64_t i0 = block * rows_per_block, rows = std::min(rows_per_block, g.h - i0), pixels = rows * g.w;
      dcols.resize(jd * pixels);
      const Taps taps{g.kh, g.kw, i0 * g.sh - g.top, g.sh, 1, -g.left, g.sw, 1};
      gather(gp + n * gs[0] + group * g.cout_g * gs[1], gs[1], gs[2], gs[3], g.cout_g, g.oh, g.ow, taps, rows, g.w,
             dcols.data());
      const at::Tensor dcols_m = matrix(dcols.data(), jd, pixels, acc);
      const at::Tensor w_g = w_acc.narrow(0, group * g.cin_g, g.cin_g);
      if (need_w) {
        xcols.resize(g.cin_g * pixels);
        const Taps plain{1, 1, i0, 1, 0, 0, 1, 0};
        gather(xp + n * xs[0] + group * g.cin_g * xs[1], xs[1], xs[2], xs[3], g.cin_g, g.h, g.w, plain, rows, g.w,
               xcols.data());
        mm_into(dw_parts[part].narrow(0, group * g.cin_g, g.cin_g), matrix(xcols.data(), g.cin_g, pixels, acc),
                dcols_m.t(), false);
      }
      if (need_x) {
        dx_block.resize(g.cin_g * pixels);
        auto dx_m = matrix(dx_block.data(), g.cin_g, pixels, acc);
        mm_into(dx_m, w_g, dcols_m, true);
        const at::Tensor dst = dx.select(0, n).narrow(0, group * g.cin_g, g.cin_g).narrow(1, i0, rows);
        dst.copy_(dx_m.view({g.cin_g, rows, g.w}));  // converts to x's dtype, through dx's strides
      }
    }
  });
  return need_w ? dw_parts.sum(0) : at::Tensor();
}

}  // namespace

at::Tensor upsample_crop_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             at::IntArrayRef stride, at::IntArrayRef crop, at::IntArrayRef out_size, int64_t groups) {
  TORCH_CHECK_VALUE(out_size.size() == 2, "out_size must have two entries");
  const UpGeometry g = make_up_geometry(x, weight, stride, crop, out_size[0], out_size[1], groups);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // the ATen calls inside are the kernel's own
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == g.cout && bias->device() == x.device(),
                      "bias must be a vector of ", g.cout, " on x's device");
  }
  at::Tensor out = at::empty({g.n, g.cout, g.oh, g.ow}, x.options(), x.suggest_memory_format());
  maybe_poison(out);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "upsample_crop_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    forward_impl<scalar_t, acc_t>(x, weight, bias, out, g);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> upsample_crop_bwd_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                                      const at::Tensor& weight,
                                                                      at::IntArrayRef stride, at::IntArrayRef crop,
                                                                      int64_t groups, std::array<bool, 3> mask) {
  TORCH_CHECK_VALUE(grad.dim() == 4, "grad must be N x Cout x H x W");
  const UpGeometry g = make_up_geometry(x, weight, stride, crop, grad.size(2), grad.size(3), groups);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  TORCH_CHECK_VALUE(grad.size(0) == g.n && grad.size(1) == g.cout, "grad ", grad.sizes(), " does not fit x ",
                    x.sizes(), " and weight ", weight.sizes());
  TORCH_CHECK_TYPE(grad.scalar_type() == x.scalar_type(), "grad must have x's dtype");
  const auto acc = acc_type_of(x);
  const at::Tensor empty = x.new_empty({0});
  at::Tensor dx = mask[0] ? at::empty(x.sizes(), x.options(), x.suggest_memory_format()) : empty;
  at::Tensor dw = empty, db = empty;
  maybe_poison(dx);
  if ((mask[0] || mask[1]) && g.n > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "upsample_crop_bwd_cpu", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      const at::Tensor dw_acc = backward_impl<scalar_t, acc_t>(grad, x, weight, g, dx, mask[0], mask[1]);
      if (mask[1]) dw = dw_acc.view(weight.sizes()).to(weight.scalar_type());
    });
  } else if (mask[1]) {
    dw = at::zeros(weight.sizes(), weight.options());
  }
  if (mask[2]) db = grad.sum({0, 2, 3}, false, acc).to(grad.scalar_type());
  return {dx, dw, db};
}

}  // namespace fcnkern

TORCH_LIBRARY_IMPL(fcnkern, CPU, m) {
  m.impl("upsample_crop", &fcnkern::upsample_crop_cpu);
  m.impl("upsample_crop_bwd", &fcnkern::upsample_crop_bwd_cpu);
}
