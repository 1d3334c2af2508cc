"""The CUDA upsampling kernels' per-element arithmetic, run on the CPU.

Every thread of cpp/upsample_cuda.cu computes its output elements with a function from
cpp/upsample_cuda_elements.h (host-and-device code): the bilinear forward's rows (a thread's share of a row's
columns down a tile of rows, each column's and each row's taps worked out once), the two separable backward
passes, the learned forward's sub-kernel taps, dgrad's kh x kw kept outputs, and wgrad's per-pixel terms (which the
kernel sums with a shared-memory tree). Here those functions are compiled for the CPU and called for every element,
in float64, against conv_transpose2d + slicing and autograd: a check of the gather maths without a GPU. The launch
machinery is exercised only on a GPU (bench/gpu_suite.sh)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import LAYOUTS, draw_window, generator, load_cpu_check, memory_layout
from hypothesis import given
from hypothesis import strategies as st

import fcnkern

SOURCE = r"""
#include <ATen/ATen.h>
#include <algorithm>
#include <vector>
#include "upsample_cuda_elements.h"

using namespace fcnkern;
using namespace fcnkern::up_elements;

Strides4 strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

// Both index plans the CUDA forward launches: 32-bit with multiply-shift dividers, and 64-bit.
at::Tensor bilinear_fwd(at::Tensor x, int64_t f, int64_t top, int64_t left, int64_t oh, int64_t ow, bool narrow) {
  at::Tensor out = at::full({x.size(0), x.size(1), oh, ow}, NAN, x.options());
  TORCH_CHECK(bilinear_fwd_fits_32bit(x, out, f), "test sizes must fit the 32-bit plan");
  const double* src = x.data_ptr<double>();
  double* dst = out.data_ptr<double>();
  // Tiles of `tile` rows (the last one short) as a block of `step` threads would share them: the tile's row taps
  // first (the kernel's shared memory), then threads 0 .. step - 1, each every step-th column down the tile.
  const int64_t rows = out.size(0) * out.size(1) * oh, step = 3, tile = 5;
  const auto narrow_plan = bilinear_fwd_plan<int32_t, FastDiv32>(x, out, f, top, left);
  const auto wide_plan = bilinear_fwd_plan<int64_t, PlainDiv64>(x, out, f, top, left);
  for (int64_t base = 0; base < rows; base += tile) {
    const int64_t count = std::min(tile, rows - base);
    std::vector<BilinearRowTaps<double, int32_t>> narrow_taps;
    std::vector<BilinearRowTaps<double, int64_t>> wide_taps;
    for (int64_t i = 0; i < count; ++i) {
      narrow_taps.push_back(bilinear_row_taps<double>(int32_t(base + i), narrow_plan));
      wide_taps.push_back(bilinear_row_taps<double>(base + i, wide_plan));
    }
    for (int64_t first = 0; first < step; ++first) {
      if (narrow) {
        bilinear_fwd_rows<double, double>(narrow_taps.data(), int32_t(count), int32_t(first), int32_t(step), src,
                                          dst, narrow_plan);
      } else {
        bilinear_fwd_rows<double, double>(wide_taps.data(), count, first, step, src, dst, wide_plan);
      }
    }
  }
  return out;
}

// FastDiv32 against / and %: n / d and n % d for every (d, n) pair given, as a 2 x len tensor.
at::Tensor fast_divmod(at::Tensor d, at::Tensor n) {
  at::Tensor out = at::empty({2, n.numel()}, n.options());
  for (int64_t i = 0; i < n.numel(); ++i) {
    const FastDiv32 div(int32_t(d.data_ptr<int64_t>()[i]));
    const int32_t q = div.div(int32_t(n.data_ptr<int64_t>()[i]));
    out.data_ptr<int64_t>()[i] = q;
    out.data_ptr<int64_t>()[n.numel() + i] = n.data_ptr<int64_t>()[i] - int64_t(q) * div.d;
  }
  return out;
}

at::Tensor bilinear_bwd(at::Tensor grad, int64_t f, int64_t top, int64_t left, int64_t h, int64_t w, bool narrow) {
  const int64_t n = grad.size(0), c = grad.size(1), oh = grad.size(2), ow = grad.size(3);
  // In the kernels' order: the height pass into by_row, then the width pass into dx; either index plan.
  at::Tensor by_row = at::full({n, c, h, ow}, NAN, grad.options());
  at::Tensor dx = at::full({n, c, h, w}, NAN, grad.options());
  TORCH_CHECK(bilinear_bwd_fits_32bit(grad, by_row, dx, f), "test sizes must fit the 32-bit plan");
  const double* g = grad.data_ptr<double>();
  double *mid = by_row.data_ptr<double>(), *out = dx.data_ptr<double>();
  if (narrow) {
    const auto rows = bilinear_axis_plan<int32_t, FastDiv32>(grad, by_row, f, top, oh);
    const auto cols = bilinear_axis_plan<int32_t, FastDiv32>(by_row, dx, f, left, ow);
    for (int32_t i = 0; i < int32_t(by_row.numel()); ++i) {
      bilinear_bwd_axis_element<2, double, double, double>(i, g, mid, rows);
    }
    for (int32_t i = 0; i < int32_t(dx.numel()); ++i) {
      bilinear_bwd_axis_element<3, double, double, double>(i, mid, out, cols);
    }
  } else {
    const auto rows = bilinear_axis_plan<int64_t, PlainDiv64>(grad, by_row, f, top, oh);
    const auto cols = bilinear_axis_plan<int64_t, PlainDiv64>(by_row, dx, f, left, ow);
    for (int64_t i = 0; i < by_row.numel(); ++i) bilinear_bwd_axis_element<2, double, double, double>(i, g, mid, rows);
    for (int64_t i = 0; i < dx.numel(); ++i) bilinear_bwd_axis_element<3, double, double, double>(i, mid, out, cols);
  }
  return dx;
}

UpGeometry geometry(const at::Tensor& x, const at::Tensor& w, std::vector<int64_t> stride, std::vector<int64_t> crop,
                    int64_t oh, int64_t ow, int64_t groups) {
  UpGeometry g{};
  g.n = x.size(0), g.cin = x.size(1), g.h = x.size(2), g.w = x.size(3), g.groups = groups;
  g.cin_g = g.cin / groups, g.cout_g = w.size(1), g.cout = g.cout_g * groups, g.kh = w.size(2), g.kw = w.size(3);
  g.sh = stride[0], g.sw = stride[1], g.top = crop[0], g.left = crop[1], g.oh = oh, g.ow = ow;
  return g;
}

at::Tensor learned_fwd(at::Tensor x, at::Tensor w, at::Tensor bias, std::vector<int64_t> stride,
                       std::vector<int64_t> crop, int64_t oh, int64_t ow, int64_t groups) {
  const UpGeometry g = geometry(x, w, stride, crop, oh, ow, groups);
  at::Tensor out = at::full({g.n, g.cout, oh, ow}, NAN, x.options());
  for (int64_t i = 0; i < out.numel(); ++i) {
    learned_fwd_element<double, double>(i, x.data_ptr<double>(), strides_of(x), w.data_ptr<double>(), strides_of(w),
                                        bias.data_ptr<double>(), out.data_ptr<double>(), strides_of(out), g);
  }
  return out;
}

std::vector<at::Tensor> learned_bwd(at::Tensor grad, at::Tensor x, at::Tensor w, std::vector<int64_t> stride,
                                    std::vector<int64_t> crop, int64_t groups) {
  const UpGeometry g = geometry(x, w, stride, crop, grad.size(2), grad.size(3), groups);
  at::Tensor dx = at::full(x.sizes(), NAN, x.options());
  for (int64_t i = 0; i < dx.numel(); ++i) {
    learned_dgrad_element<double, double>(i, grad.data_ptr<double>(), strides_of(grad), w.data_ptr<double>(),
                                          strides_of(w), dx.data_ptr<double>(), strides_of(dx), g);
  }
  at::Tensor dw = at::full(w.sizes(), NAN, w.options());  // contiguous, as the kernel's dw[e]
  for (int64_t e = 0; e < dw.numel(); ++e) {
    double acc = 0;
    for (int64_t p = 0; p < g.n * g.h * g.w; ++p) {
      acc += learned_wgrad_term<double, double>(e, p, grad.data_ptr<double>(), strides_of(grad),
                                                x.data_ptr<double>(), strides_of(x), g);
    }
    dw.data_ptr<double>()[e] = acc;
  }
  return {dx, dw};
}
"""


@pytest.fixture(scope="module")
def elements():
    functions = ["bilinear_fwd", "bilinear_bwd", "learned_fwd", "learned_bwd", "fast_divmod"]
    return load_cpu_check("fcnkern_upsample_elements_cpu", SOURCE, functions)


def _window(full, crop, size):
    return full[:, :, crop[0] : crop[0] + size[0], crop[1] : crop[1] + size[1]]


# (channels, h, w, factor, crop, out_size): FCN-32s's and FCN-8s's finals, crop 0, a crop reaching the last row.
BILINEAR = [(3, 3, 2, 32, (19, 19), (41, 29)), (2, 5, 4, 8, (31, 3), (7, 23)), (1, 4, 5, 2, (0, 0), (10, 12)),
            (2, 3, 3, 3, (2, 1), (10, 11))]  # fmt: skip


@pytest.mark.parametrize("case", BILINEAR, ids=lambda c: f"f{c[3]}crop{c[4][0]}-{c[4][1]}")
def test_bilinear_elements(elements, case):
    _check_bilinear(elements, case, ("channels_last", "contiguous"), generator("bil-elements", case))


@given(
    data=st.data(),
    c=st.integers(1, 4),
    h=st.integers(1, 6),
    w=st.integers(1, 6),
    f=st.integers(1, 9),
    layouts=st.tuples(st.sampled_from(LAYOUTS), st.sampled_from(LAYOUTS)),
)
def test_bilinear_elements_on_random_geometries(elements, data, c, h, w, f, layouts):
    """Random factors and windows anywhere in the full output; x and the upstream gradient each contiguous,
    channels_last or strided."""
    crop, size = draw_window(data, ((h + 1) * f, (w + 1) * f))
    case = (c, h, w, f, crop, size)
    _check_bilinear(elements, case, layouts, generator("bil-elements-random", case, layouts))


def _check_bilinear(elements, case, layouts, g):
    """Both index plans of the forward and of the two backward passes against the diagonal ConvTranspose2d + crop
    in float64; layouts are x's and the upstream gradient's."""
    c, h, w, f, crop, size = case
    x = memory_layout(torch.randn(2, c, h, w, generator=g, dtype=torch.float64), layouts[0])
    weight = fcnkern.bilinear_kernel(2 * f, torch.float64).expand(c, 1, 2 * f, 2 * f)
    xr = x.clone().requires_grad_()
    ref = _window(F.conv_transpose2d(xr, weight, stride=f, groups=c), crop, size)
    upstream = memory_layout(torch.randn(ref.shape, generator=g, dtype=torch.float64), layouts[1])
    (ref_dx,) = torch.autograd.grad(ref, xr, upstream)
    for narrow in (True, False):
        out = elements.bilinear_fwd(x, f, *crop, *size, narrow)
        torch.testing.assert_close(out, ref.detach(), rtol=1e-12, atol=1e-12)
    for narrow in (True, False):
        dx = elements.bilinear_bwd(upstream, f, *crop, h, w, narrow)
        torch.testing.assert_close(dx, ref_dx, rtol=1e-12, atol=1e-12)


# (cin, cout_g, groups, h, w, kernel, stride, crop, out_size)
LEARNED = [
    (4, 4, 1, 3, 2, (64, 64), (32, 32), (19, 19), (37, 5)),  # FCN-32s's upscore, full mixing
    (5, 3, 1, 5, 7, (4, 4), (2, 2), (0, 0), (12, 16)),  # upscore2
    (6, 3, 2, 4, 4, (5, 3), (3, 2), (1, 2), (11, 7)),  # odd kernel, groups 2, window to the last column
    (3, 1, 3, 2, 3, (16, 16), (8, 8), (9, 5), (13, 19)),  # per-channel, upscore8-like
]


@pytest.mark.parametrize("case", LEARNED, ids=lambda c: f"k{c[5][0]}x{c[5][1]}s{c[6][0]}g{c[2]}")
def test_learned_elements(elements, case):
    _check_learned(elements, case, ("contiguous",) * 3, generator("learned-elements", case))


@given(
    data=st.data(),
    groups=st.integers(1, 3),
    cin_g=st.integers(1, 3),
    cout_g=st.integers(1, 3),
    h=st.integers(1, 5),
    w=st.integers(1, 5),
    kernel=st.tuples(st.integers(1, 9), st.integers(1, 9)),
    stride=st.tuples(st.integers(1, 5), st.integers(1, 5)),
    layouts=st.tuples(*[st.sampled_from(LAYOUTS)] * 3),
)
def test_learned_elements_on_random_geometries(elements, data, groups, cin_g, cout_g, h, w, kernel, stride, layouts):
    """Random kernels (smaller and larger than the stride), strides, groups and windows; x, the weight and the
    upstream gradient each contiguous, channels_last or strided."""
    full = tuple((n - 1) * st_ + k for n, st_, k in zip((h, w), stride, kernel, strict=True))
    crop, size = draw_window(data, full)
    case = (groups * cin_g, cout_g, groups, h, w, kernel, stride, crop, size)
    _check_learned(elements, case, layouts, generator("learned-elements-random", case, layouts))


def _check_learned(elements, case, layouts, g):
    """Forward, dx and dW against conv_transpose2d + crop and autograd in float64; layouts are x's, the weight's
    and the upstream gradient's."""
    cin, cout_g, groups, h, w, kernel, stride, crop, size = case
    x = memory_layout(torch.randn(2, cin, h, w, generator=g, dtype=torch.float64), layouts[0])
    weight = memory_layout(torch.randn(cin, cout_g, *kernel, generator=g, dtype=torch.float64), layouts[1])
    bias = torch.randn(cout_g * groups, generator=g, dtype=torch.float64)
    xr, wr = x.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = _window(F.conv_transpose2d(xr, wr, bias, stride, groups=groups), crop, size)
    upstream = memory_layout(torch.randn(ref.shape, generator=g, dtype=torch.float64), layouts[2])
    ref_dx, ref_dw = torch.autograd.grad(ref, (xr, wr), upstream)
    out = elements.learned_fwd(x, weight, bias, list(stride), list(crop), *size, groups)
    torch.testing.assert_close(out, ref.detach(), rtol=1e-12, atol=1e-12)
    dx, dw = elements.learned_bwd(upstream, x, weight, list(stride), list(crop), groups)
    torch.testing.assert_close(dx, ref_dx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dw, ref_dw, rtol=1e-12, atol=1e-12)


def test_fast_division(elements):
    """cpp/fast_div.h's multiply-shift division equals / and % over its whole domain's edges: every divisor up to
    4096 and every power of two and its neighbours up to 2^31 - 1, each with dividends 0, 1, d - 1, d, d + 1, 2^31 - 1
    and its neighbours, and random ones."""
    g = torch.Generator().manual_seed(7)
    limit = 2**31 - 1
    divisors = set(range(1, 4097))
    for k in range(1, 32):
        divisors |= {2**k - 1, 2**k, 2**k + 1}
    divisors |= set(torch.randint(1, limit, (2000,), generator=g).tolist())
    divisors = sorted(d for d in divisors if 1 <= d <= limit)
    ds, ns = [], []
    for d in divisors:
        edges = [0, 1, d - 1, d, d + 1, 2 * d - 1, 2 * d, limit, limit - 1, limit - d, (limit // d) * d - 1]
        edges += torch.randint(0, limit, (8,), generator=g).tolist()
        for n in edges:
            if 0 <= n <= limit:
                ds.append(d)
                ns.append(n)
    d_t, n_t = torch.tensor(ds), torch.tensor(ns)
    got = elements.fast_divmod(d_t, n_t)
    assert torch.equal(got[0], n_t // d_t)
    assert torch.equal(got[1], n_t % d_t)
