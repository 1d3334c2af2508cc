"""The CUDA conv + ReLU kernels' index arithmetic, run on the CPU.

cpp/conv_relu_cuda.cu multiplies three implicit GEMMs whose operands are gathered straight from the tensors: the
forward (bias + ReLU in the epilogue), dgrad (which output pixels tap an input pixel through (r, s), the ReLU mask
applied on load) and wgrad (the pixel reduction split over grid.z). Those gathers live in cpp/conv_relu_problems.h
as host-and-device code. Here they are compiled for the CPU and driven by a plain triple loop in place of the
shared-memory tile engine, in float64, and compared with PyTorch: a check of the gather/scatter maths that runs
without a GPU. The tiling and WMMA path is exercised only on a GPU (bench/gpu_suite.sh)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import LAYOUTS, generator, load_cpu_check, memory_layout
from hypothesis import given
from hypothesis import strategies as st

SOURCE = r"""
#include <ATen/ATen.h>
#include "conv_relu_problems.h"

#include <cstring>

using namespace fcnkern;
using namespace fcnkern::conv_gemm;

// What gather_gemm computes, without its tiles: every grid.z slice, every (row, column), the slice's reduction,
// each element through the row and column contexts the kernel keeps in shared memory.
template <typename P>
void run(P p, int64_t z) {
  for (int64_t zi = 0; zi < z; ++zi) {
    P q = p;
    q.begin(zi);
    for (int64_t m = 0; m < q.rows(); ++m) {
      const auto am = q.a_m(m);
      for (int64_t n = 0; n < q.cols(); ++n) {
        const auto bn = q.b_n(n);
        acc_of<typename P::scalar_t> acc = 0;
        for (int64_t k = q.k_begin; k < q.k_end; ++k) acc += q.a(am, q.a_k(k), true) * q.b(q.b_k(k), bn, true);
        q.store(am, m, n, acc);
      }
    }
    // Past the GEMM's edges the kernel passes in_range = false with whatever its shared memory holds: 0, reading
    // only element 0.
    typename P::AM am;
    typename P::AK ak;
    typename P::BK bk;
    typename P::BN bn;
    std::memset(&am, 0x5a, sizeof am), std::memset(&ak, 0xa5, sizeof ak);
    std::memset(&bk, 0x5a, sizeof bk), std::memset(&bn, 0xa5, sizeof bn);
    TORCH_CHECK(q.a(am, ak, false) == 0 && q.b(bk, bn, false) == 0, "an element outside the GEMM is not 0");
  }
}

at::Tensor forward(at::Tensor x, at::Tensor w, std::optional<at::Tensor> bias, std::vector<int64_t> stride,
                   std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups, bool relu) {
  const ConvGeometry g = make_geometry(x, w, stride, padding, dilation, groups);
  check_args(x, w, g);
  at::Tensor y = at::full({g.n, g.k, g.oh, g.ow}, NAN, x.options().memory_format(x.suggest_memory_format()));
  at::Tensor wc = w.contiguous();
  Forward<double> p{make_shape(g), x.data_ptr<double>(), wc.data_ptr<double>(),
                    bias ? bias->data_ptr<double>() : nullptr, y.data_ptr<double>(), strides_of(x), strides_of(y),
                    relu};
  run(p, g.groups);
  return y;
}

std::vector<at::Tensor> backward(at::Tensor grad, at::Tensor y, at::Tensor x, at::Tensor w,
                                 std::vector<int64_t> stride, std::vector<int64_t> padding,
                                 std::vector<int64_t> dilation, int64_t groups, bool relu, int64_t splits,
                                 bool strided_dgrad) {
  const ConvGeometry g = make_geometry(x, w, stride, padding, dilation, groups);
  TORCH_CHECK(coordinates_fit_int32(make_shape(g)));
  at::Tensor wc = w.contiguous();
  at::Tensor dx = at::full(x.sizes(), NAN, x.options().memory_format(x.suggest_memory_format()));
  const auto dgrad = [&](auto strided) {
    Dgrad<double, decltype(strided)::value> d{make_shape(g), grad.data_ptr<double>(), y.data_ptr<double>(),
                                              wc.data_ptr<double>(), dx.data_ptr<double>(), strides_of(grad),
                                              strides_of(y), strides_of(dx), relu};
    run(d, g.groups);
  };
  if (strided_dgrad) {
    dgrad(std::true_type{});
  } else {
    dgrad(std::false_type{});
  }
  const int64_t pixels = g.n * g.oh * g.ow;
  at::Tensor ws = at::full({splits, g.k, g.j}, NAN, x.options());
  Wgrad<double> wg{make_shape(g), grad.data_ptr<double>(), y.data_ptr<double>(), x.data_ptr<double>(),
                   ws.data_ptr<double>(), strides_of(grad), strides_of(y), strides_of(x), relu, g.groups,
                   wgrad_chunk(pixels, splits, 32)};
  run(wg, g.groups * splits);
  return {dx, ws.sum(0).reshape(w.sizes())};
}

// The launcher's check that a geometry's coordinates fit the contexts' 32-bit fields.
bool coordinates_fit(int64_t h, int64_t w, int64_t pad, int64_t dilation) {
  const int64_t span = (3 - 1) * dilation + 1, oh = h + 2 * pad - span + 1, ow = w + 2 * pad - span + 1;
  const Shape s{1, 1, h, w, 1, 3, 3, oh, ow, 1, 1, 9, 1, 1, pad, pad, dilation, dilation};
  return coordinates_fit_int32(s);
}
"""


@pytest.fixture(scope="module")
def problems():
    return load_cpu_check("fcnkern_conv_problems_cpu", SOURCE, ["forward", "backward", "coordinates_fit"])


# (n, c, h, w, k, r, s, stride, padding, dilation, groups, channels_last)
CASES = [
    (2, 3, 7, 6, 5, 3, 3, (1, 1), (1, 1), (1, 1), 1, False),
    (1, 4, 9, 8, 6, 3, 2, (2, 1), (2, 0), (1, 1), 2, False),  # stride 2 rows, groups 2, a 3x2 kernel
    (2, 6, 5, 7, 4, 3, 3, (1, 1), (2, 2), (2, 2), 1, True),  # dilation 2, channels_last
    (1, 3, 4, 3, 2, 1, 1, (1, 1), (0, 0), (1, 1), 1, False),  # 1x1
    (1, 3, 2, 3, 4, 3, 3, (1, 1), (5, 5), (1, 1), 1, False),  # padding far wider than the input
    (1, 5, 11, 10, 5, 7, 7, (3, 3), (1, 2), (1, 1), 5, True),  # depthwise 7x7, stride 3
]


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"c{c[1]}k{c[4]}r{c[5]}x{c[6]}s{c[7][0]}d{c[9][0]}g{c[10]}")
def test_gathers_match_pytorch(problems, case, relu):
    *geometry, channels_last = case
    layouts = ("channels_last" if channels_last else "contiguous", "contiguous", "contiguous")
    _check_gathers(problems, tuple(geometry), relu, layouts, generator("cuda-problems", case, relu))


@given(
    data=st.data(),
    n=st.integers(1, 3),
    groups=st.integers(1, 3),
    c_g=st.integers(1, 3),
    k_g=st.integers(1, 3),
    kernel=st.tuples(st.integers(1, 5), st.integers(1, 5)),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    padding=st.tuples(st.integers(0, 4), st.integers(0, 4)),
    dilation=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    relu=st.booleans(),
    layouts=st.tuples(*[st.sampled_from(LAYOUTS)] * 3),
)
def test_gathers_match_pytorch_on_random_geometries(
    problems, data, n, groups, c_g, k_g, kernel, stride, padding, dilation, relu, layouts
):  # fmt: skip
    """Random kernels, strides, paddings, dilations and groups, and x, y and dy each contiguous, channels_last or
    strided (the kernels take every tensor's own strides): the gathers against PyTorch as above."""
    # At least one output pixel: the padded input spans the dilated kernel.
    smallest = [max(1, d * (k - 1) + 1 - 2 * p) for k, p, d in zip(kernel, padding, dilation, strict=True)]
    h, w = (data.draw(st.integers(least, least + 10)) for least in smallest)
    case = (n, groups * c_g, h, w, groups * k_g, *kernel, stride, padding, dilation, groups)
    _check_gathers(problems, case, relu, layouts, generator("cuda-problems-random", case, relu, layouts))


def _check_gathers(problems, case, relu, layouts, g):
    """Forward, dx (both dgrad variants where the stride allows) and dW over one and several wgrad slices against
    F.conv2d and autograd in float64; layouts are x's, y's (as the backward reads it) and dy's."""
    n, c, h, w, k, r, s, stride, padding, dilation, groups = case
    x_layout, y_layout, grad_layout = layouts
    x = memory_layout(torch.randn(n, c, h, w, generator=g, dtype=torch.float64), x_layout)
    weight = torch.randn(k, c // groups, r, s, generator=g, dtype=torch.float64)
    bias = torch.randn(k, generator=g, dtype=torch.float64)
    args = (list(stride), list(padding), list(dilation), groups)

    xr, wr, br = (t.clone().requires_grad_() for t in (x, weight, bias))
    ref = F.conv2d(xr, wr, br, stride, padding, dilation, groups)
    ref = F.relu(ref) if relu else ref
    upstream = memory_layout(torch.randn(ref.shape, generator=g, dtype=torch.float64), grad_layout)
    ref_dx, ref_dw, ref_db = torch.autograd.grad(ref, (xr, wr, br), upstream)

    y = problems.forward(x, weight, bias, *args, relu)
    torch.testing.assert_close(y, ref.detach(), rtol=1e-12, atol=1e-12)
    y = memory_layout(y, y_layout)
    # The strided dgrad serves any stride; the unit-stride one (what the launcher picks then) only stride 1.
    strided_variants = (True, False) if tuple(stride) == (1, 1) else (True,)
    for splits, strided in ((1, strided_variants[-1]), (3, strided_variants[0])):  # several slices, a short last one
        dx, dw = problems.backward(upstream, y, x, weight, *args, relu, splits, strided)
        torch.testing.assert_close(dx, ref_dx, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(dw, ref_dw, rtol=1e-12, atol=1e-12)
    # The bias gradient kernel sums the same masked gradient.
    masked = upstream * ~(y <= 0) if relu else upstream
    torch.testing.assert_close(masked.sum((0, 2, 3)), ref_db, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("strided", [True, False])
def test_gathers_pass_the_gradient_of_nan_outputs(problems, strided):
    """PyTorch's ReLU backward passes the gradient of a NaN output (NaN <= 0 is false). A NaN bias makes channel 1
    NaN from finite x and weight: dgrad's and wgrad's masked loads must pass its gradient, so dx and dW stay finite
    and equal PyTorch's."""
    g = generator("cuda-problems-nan", strided)
    x = torch.randn(2, 3, 7, 6, generator=g, dtype=torch.float64)
    weight = torch.randn(5, 3, 3, 3, generator=g, dtype=torch.float64)
    bias = torch.randn(5, generator=g, dtype=torch.float64)
    bias[1] = float("nan")
    args = ([1, 1], [1, 1], [1, 1], 1)
    xr, wr = (t.clone().requires_grad_() for t in (x, weight))
    ref = F.relu(F.conv2d(xr, wr, bias, 1, 1))
    upstream = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    ref_dx, ref_dw = torch.autograd.grad(ref, (xr, wr), upstream)
    y = problems.forward(x, weight, bias, *args, True)
    assert torch.equal(y.isnan(), ref.isnan()) and y[:, 1].isnan().all()
    dx, dw = problems.backward(upstream, y, x, weight, *args, True, 2, strided)
    assert ref_dx.isfinite().all() and ref_dw.isfinite().all()
    torch.testing.assert_close(dx, ref_dx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dw, ref_dw, rtol=1e-12, atol=1e-12)


def test_coordinate_bound(problems):
    """The CUDA launcher refuses geometries whose positions (padding and taps included) pass 2^31, which the gather
    contexts' 32-bit coordinates cannot hold; FCN's (padding 100 on a 500 x 500 input) and far larger ones fit."""
    assert problems.coordinates_fit(500, 500, 100, 1)
    assert problems.coordinates_fit(2**28, 7, 1, 1)
    assert not problems.coordinates_fit(2**30, 7, 1, 1)
    assert not problems.coordinates_fit(7, 7, 2**30, 1)
    assert not problems.coordinates_fit(2**30 + 8, 7, 1, 2**29)  # a dilated tap reaching far: oh is only 10
