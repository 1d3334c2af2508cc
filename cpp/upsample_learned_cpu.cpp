// CPU kernels of learned transposed-convolution upsampling with the crop folded in (fcnkern.upsample_crop).
//
// Forward, by output cell: the kept outputs whose full-output coordinates share (Y / sh, X / sw) = (qy, qx) form a
// cell of sh x sw pixels that all read the same th x tw input taps x[:, qy - t, qx - u]. So each task (an image, a
// group, a block of cell rows and of output channels) is one GEMM, product[cell, (co, py, px)] = sum over
// (ci, t, u) of x[ci, qy - t, qx - u] * w[ci, co, py + t sh, px + u sw], and its kept pixels are copied out row by
// row (runs of sw columns). Each output element is written by exactly one task: no atomics, no races.
//
// Backward, its adjoint by cell: the kept gradient arranged by cell feeds two GEMMs per task, one towards dx (summed
// over each input pixel's th x tw cells afterwards) and one into dW (see backward_impl). The full uncropped output,
// or its gradient, never exists in memory.
//
// Any strides (NCHW, channels_last, views); fp16/bf16 converted to fp32 at the gathers and the stores.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

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

// Budget of a task's product or gathered gradient block, in bytes: most of a 2 MiB L2, as in the conv kernels.
constexpr int64_t kBlockBytes = 1536 << 10;

// How the cell formulation cuts a layer into tasks. Cells are the full output's sh x sw squares (Y / sh, X / sw)
// that the kept window touches; each task takes one image, one group, a block of cell rows and (in the forward, or
// in turn in the backward) a block of output channels, so that its [cells, (co, py, px)] block stays within budget.
struct CellPlan {
  int64_t th, tw, depth, phases, qy0, qx0, cell_rows, cell_cols, ch_per_block, ch_blocks, rows_per_block, row_blocks;
};

template <typename acc_t>
CellPlan make_cell_plan(const UpGeometry& g) {
  CellPlan p{};
  p.th = (g.kh + g.sh - 1) / g.sh, p.tw = (g.kw + g.sw - 1) / g.sw, p.depth = g.cin_g * p.th * p.tw;
  p.phases = g.sh * g.sw;
  p.qy0 = g.top / g.sh, p.qx0 = g.left / g.sw;
  p.cell_rows = (g.top + g.oh - 1) / g.sh - p.qy0 + 1, p.cell_cols = (g.left + g.ow - 1) / g.sw - p.qx0 + 1;
  const int64_t row_bytes = p.cell_cols * p.phases * int64_t(sizeof(acc_t));
  p.ch_per_block = std::clamp<int64_t>(kBlockBytes / std::max<int64_t>(row_bytes, 1), 1, g.cout_g);
  p.ch_blocks = (g.cout_g + p.ch_per_block - 1) / p.ch_per_block;
  p.rows_per_block =
      std::clamp<int64_t>(kBlockBytes / std::max<int64_t>(row_bytes * p.ch_per_block, 1), 1, p.cell_rows);
  p.row_blocks = (p.cell_rows + p.rows_per_block - 1) / p.rows_per_block;
  return p;
}

// The weight by (group, channel block) as depth x (channels x sh x sw), dense: a[(ci, t, u), (co, py, px)] =
// w[ci, co, py + t sh, px + u sw], 0 past the kernel (a zero tap times an infinite input gives NaN where
// conv_transpose2d skips the tap; only kernels that are not a multiple of the stride have such taps).
template <typename acc_t>
std::vector<at::Tensor> cell_weight_blocks(const at::Tensor& w_acc, const UpGeometry& g, const CellPlan& p) {
  const acc_t* wp = w_acc.const_data_ptr<acc_t>();
  std::vector<at::Tensor> blocks(g.groups * p.ch_blocks);
  for (int64_t group = 0; group < g.groups; ++group) {
    for (int64_t cb = 0; cb < p.ch_blocks; ++cb) {
      const int64_t co0 = cb * p.ch_per_block, chans = std::min(p.ch_per_block, g.cout_g - co0);
      const int64_t cols = chans * p.phases;
      at::Tensor a = at::zeros({p.depth, cols}, w_acc.options());
      acc_t* ap = a.mutable_data_ptr<acc_t>();
      for (int64_t ci = 0; ci < g.cin_g; ++ci) {
        for (int64_t t = 0; t < p.th; ++t) {
          for (int64_t u = 0; u < p.tw; ++u) {
            acc_t* row = ap + ((ci * p.th + t) * p.tw + u) * cols;
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
      blocks[group * p.ch_blocks + cb] = a;
    }
  }
  return blocks;
}

// taps[(r, qx), (ci, t, u)] = x[ci, qy0 + r0 + r - t, qx0 + qx - u] over `rows` cell rows, 0 outside the input;
// xg points at the image's group.
template <typename scalar_t, typename acc_t>
void gather_taps(const scalar_t* xg, const int64_t* xs, const UpGeometry& g, const CellPlan& p, int64_t r0,
                 int64_t rows, acc_t* taps) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t qx = 0; qx < p.cell_cols; ++qx) {
      acc_t* dst = taps + (r * p.cell_cols + qx) * p.depth;
      for (int64_t ci = 0; ci < g.cin_g; ++ci) {
        for (int64_t t = 0; t < p.th; ++t) {
          const int64_t i = p.qy0 + r0 + r - t;
          for (int64_t u = 0; u < p.tw; ++u, ++dst) {
            const int64_t j = p.qx0 + qx - u;
            *dst = i >= 0 && i < g.h && j >= 0 && j < g.w ? static_cast<acc_t>(xg[ci * xs[1] + i * xs[2] + j * xs[3]])
                                                          : acc_t(0);
          }
        }
      }
    }
  }
}

// Calls f(c, co, r, py, oy, qx, ox0, lo, hi) for every kept run of a block of cells (rows cell rows from r0, output
// channels co0 ..): output row oy, columns ox0 + [lo, hi) of cell column qx. Rows outside the window get no call.
template <typename F>
void for_kept_runs(const UpGeometry& g, const CellPlan& p, int64_t group, int64_t co0, int64_t chans, int64_t r0,
                   int64_t rows, const F& f) {
  for (int64_t co = 0; co < chans; ++co) {
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t py = 0; py < g.sh; ++py) {
        const int64_t oy = (p.qy0 + r0 + r) * g.sh + py - g.top;
        if (oy < 0 || oy >= g.oh) continue;
        for (int64_t qx = 0; qx < p.cell_cols; ++qx) {
          const int64_t ox0 = (p.qx0 + qx) * g.sw - g.left;
          const int64_t lo = std::max<int64_t>(0, -ox0), hi = std::min<int64_t>(g.sw, g.ow - ox0);
          f(group * g.cout_g + co0 + co, co, r, py, oy, qx, ox0, lo, hi);
        }
      }
    }
  }
}

template <typename scalar_t, typename acc_t>
void forward_impl(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const at::Tensor& out, const UpGeometry& g) {
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  const CellPlan p = make_cell_plan<acc_t>(g);
  const std::vector<at::Tensor> a_blocks = cell_weight_blocks<acc_t>(weight.to(acc).contiguous(), g, p);
  at::Tensor bias_acc = bias.has_value() ? bias->to(acc).contiguous() : at::Tensor();
  const acc_t* bp = bias_acc.defined() ? bias_acc.const_data_ptr<acc_t>() : nullptr;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const int64_t xs[4] = {x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
  const int64_t os[4] = {out.stride(0), out.stride(1), out.stride(2), out.stride(3)};
  const int64_t tasks = g.n * g.groups * p.row_blocks * p.ch_blocks;
  run_tasks(tasks, spread_tasks(tasks), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> taps, product;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t cb = task % p.ch_blocks, rb = (task / p.ch_blocks) % p.row_blocks;
      const int64_t group = (task / (p.ch_blocks * p.row_blocks)) % g.groups;
      const int64_t n = task / (p.ch_blocks * p.row_blocks * g.groups);
      const int64_t r0 = rb * p.rows_per_block, rows = std::min(p.rows_per_block, p.cell_rows - r0);
      const int64_t cells = rows * p.cell_cols;
      const at::Tensor& a = a_blocks[group * p.ch_blocks + cb];
      const int64_t cols = a.size(1);
      taps.resize(cells * p.depth);
      gather_taps(xp + n * xs[0] + group * g.cin_g * xs[1], xs, g, p, r0, rows, taps.data());
      product.resize(cells * cols);
      mm_into(matrix(product.data(), cells, cols, acc), matrix(taps.data(), cells, p.depth, acc), a, true);
      for_kept_runs(g, p, group, cb * p.ch_per_block, cols / p.phases, r0, rows,
                    [&](int64_t c, int64_t co, int64_t r, int64_t py, int64_t oy, int64_t qx, int64_t ox0, int64_t lo,
                        int64_t hi) {
                      const acc_t add = bp != nullptr ? bp[c] : acc_t(0);
                      const acc_t* src = product.data() + (r * p.cell_cols + qx) * cols + (co * g.sh + py) * g.sw;
                      scalar_t* dst = op + n * os[0] + c * os[1] + oy * os[2] + ox0 * os[3];
                      for (int64_t px = lo; px < hi; ++px) dst[px * os[3]] = static_cast<scalar_t>(src[px] + add);
                    });
    }
  });
}

// The backward by output cell, the forward's adjoint. With dyc[cell, (co, py, px)] the kept gradient arranged by
// cell (0 where cropped), each task (image, group, block of cell rows) runs over the channel blocks in turn:
// dtaps[cell, (ci, t, u)] += dyc @ A^T and dA += taps^T @ dyc (per-thread accumulators, summed in thread order).
// Then dx[ci, i, j] = sum over (t, u) of dtaps[(i + t, j + u), (ci, t, u)], a pass over the input that needs no
// atomics, and dW is dA put back in the kernel's layout. Gradient and taps are read once each, where the gather
// formulation read a (kh kw) / (sh sw) times larger block per input pixel.
// Fills dx (x's dtype and layout) if need_x; returns dW as Cin x Cout_g x kh x kw in acc_t if need_w.
template <typename scalar_t, typename acc_t>
at::Tensor backward_impl(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, const UpGeometry& g,
                         const at::Tensor& dx, bool need_x, bool need_w) {
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  const CellPlan p = make_cell_plan<acc_t>(g);
  const std::vector<at::Tensor> a_blocks = cell_weight_blocks<acc_t>(weight.to(acc).contiguous(), g, p);
  const scalar_t* gp = grad.const_data_ptr<scalar_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const int64_t gs[4] = {grad.stride(0), grad.stride(1), grad.stride(2), grad.stride(3)};
  const int64_t xs[4] = {x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
  const int64_t tasks = g.n * g.groups * p.row_blocks;
  const bool spread = spread_tasks(tasks);
  const int64_t slot_cols = p.ch_per_block * p.phases;
  LazyParts da_parts({need_w ? (spread ? at::get_num_threads() : 1) : 0, g.groups * p.ch_blocks, p.depth * slot_cols},
                     x.options().dtype(acc));
  // dtaps of every cell of every image and group: [n, groups, cell rows x cell cols, depth].
  const int64_t cells_per_plane = p.cell_rows * p.cell_cols;
  at::Tensor dtaps = at::empty({need_x ? g.n * g.groups * cells_per_plane * p.depth : 0}, x.options().dtype(acc));
  run_tasks(tasks, spread, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> taps, dyc;
    const int64_t tid = spread ? at::get_thread_num() : 0;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t rb = task % p.row_blocks, group = (task / p.row_blocks) % g.groups;
      const int64_t n = task / (p.row_blocks * g.groups);
      const int64_t r0 = rb * p.rows_per_block, rows = std::min(p.rows_per_block, p.cell_rows - r0);
      const int64_t cells = rows * p.cell_cols;
      if (need_w) {
        taps.resize(cells * p.depth);
        gather_taps(xp + n * xs[0] + group * g.cin_g * xs[1], xs, g, p, r0, rows, taps.data());
      }
      acc_t* dtaps_block = need_x ? dtaps.mutable_data_ptr<acc_t>() +
                                        ((n * g.groups + group) * cells_per_plane + r0 * p.cell_cols) * p.depth
                                  : nullptr;
      for (int64_t cb = 0; cb < p.ch_blocks; ++cb) {
        const at::Tensor& a = a_blocks[group * p.ch_blocks + cb];
        const int64_t cols = a.size(1);
        dyc.assign(cells * cols, acc_t(0));
        for_kept_runs(g, p, group, cb * p.ch_per_block, cols / p.phases, r0, rows,
                      [&](int64_t c, int64_t co, int64_t r, int64_t py, int64_t oy, int64_t qx, int64_t ox0,
                          int64_t lo, int64_t hi) {
                        acc_t* dst = dyc.data() + (r * p.cell_cols + qx) * cols + (co * g.sh + py) * g.sw;
                        const scalar_t* src = gp + n * gs[0] + c * gs[1] + oy * gs[2] + ox0 * gs[3];
                        for (int64_t px = lo; px < hi; ++px) dst[px] = static_cast<acc_t>(src[px * gs[3]]);
                      });
        const at::Tensor dyc_m = matrix(dyc.data(), cells, cols, acc);
        if (need_x) mm_into(matrix(dtaps_block, cells, p.depth, acc), dyc_m, a.t(), cb == 0);
        if (need_w) {
          da_parts.accumulate(tid, group * p.ch_blocks + cb, [&](at::Tensor slot, bool overwrite) {
            mm_into(slot.narrow(0, 0, p.depth * cols).view({p.depth, cols}),
                    matrix(taps.data(), cells, p.depth, acc).t(), dyc_m, overwrite);
          });
        }
      }
    }
  });
  if (need_x) {
    const acc_t* dt = dtaps.const_data_ptr<acc_t>();
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    const int64_t ds[4] = {dx.stride(0), dx.stride(1), dx.stride(2), dx.stride(3)};
    const int64_t planes = g.n * g.cin;
    run_tasks(planes, spread_tasks(planes), [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t c = plane % g.cin, n = plane / g.cin, group = c / g.cin_g, ci = c % g.cin_g;
        const acc_t* d = dt + (n * g.groups + group) * cells_per_plane * p.depth + ci * p.th * p.tw;
        for (int64_t i = 0; i < g.h; ++i) {
          for (int64_t j = 0; j < g.w; ++j) {
            acc_t sum = 0;
            for (int64_t t = 0; t < p.th; ++t) {
              const int64_t r = i + t - p.qy0;
              if (r < 0 || r >= p.cell_rows) continue;
              for (int64_t u = 0; u < p.tw; ++u) {
                const int64_t qx = j + u - p.qx0;
                if (qx >= 0 && qx < p.cell_cols) sum += d[(r * p.cell_cols + qx) * p.depth + t * p.tw + u];
              }
            }
            dxp[n * ds[0] + c * ds[1] + i * ds[2] + j * ds[3]] = static_cast<scalar_t>(sum);
          }
        }
      }
    });
  }
  if (!need_w) return at::Tensor();
  const at::Tensor da = da_parts.total();
  const acc_t* dap = da.const_data_ptr<acc_t>();
  at::Tensor dw = at::empty({g.cin, g.cout_g, g.kh, g.kw}, x.options().dtype(acc));
  acc_t* dwp = dw.mutable_data_ptr<acc_t>();
  for (int64_t group = 0; group < g.groups; ++group) {
    for (int64_t cb = 0; cb < p.ch_blocks; ++cb) {
      const int64_t co0 = cb * p.ch_per_block, chans = std::min(p.ch_per_block, g.cout_g - co0);
      const int64_t cols = chans * p.phases;
      const acc_t* slot = dap + (group * p.ch_blocks + cb) * p.depth * slot_cols;
      for (int64_t ci = 0; ci < g.cin_g; ++ci) {
        for (int64_t co = 0; co < chans; ++co) {
          acc_t* w = dwp + ((group * g.cin_g + ci) * g.cout_g + co0 + co) * g.kh * g.kw;
          for (int64_t ky = 0; ky < g.kh; ++ky) {
            for (int64_t kx = 0; kx < g.kw; ++kx) {
              const int64_t k = (ci * p.th + ky / g.sh) * p.tw + kx / g.sw;
              w[ky * g.kw + kx] = slot[k * cols + (co * g.sh + ky % g.sh) * g.sw + kx % g.sw];
            }
          }
        }
      }
    }
  }
  return dw;
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
