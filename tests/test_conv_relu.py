"""Parity of fcnkern.conv2d_relu with F.relu(F.conv2d(...)), forward and all gradients, on every backend and dtype,
over FCN's geometries and odd ones; ReLU boundary; gradcheck; Hypothesis; memory formats; nn.Conv2dReLU; errors."""

from __future__ import annotations

import concurrent.futures
import os
import warnings
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    LOW_PRECISION,
    assert_fp32_ok,
    assert_low_precision_ok,
    device_backend_params,
    generator,
    interpreted,
    require_backend,
    split_examples,
)
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn

import fcnkern
from fcnkern import BackendUnavailableError, conv2d_relu, conv_relu
from fcnkern.nn import Conv2dReLU

BACKENDS = device_backend_params("conv2d_relu", conv_relu.IMPLEMENTED, issue=3)

# (n, c, h, w, cout, k, stride, padding, dilation, groups): VGG/FCN layers scaled down, and odd ones.
CASES = [
    (1, 3, 11, 13, 8, 3, 1, 100, 1, 1),  # conv1_1: RGB, padding 100 (flat reduction path)
    (2, 16, 9, 7, 16, 3, 1, 1, 1, 1),  # a VGG 3x3 layer
    (1, 32, 7, 7, 24, 7, 1, 0, 1, 1),  # fc6 as a 7x7 conv on a 7x7 map: one output pixel
    (3, 40, 5, 3, 21, 1, 1, 0, 1, 1),  # score layer: 1x1, 21 classes
    (2, 5, 13, 11, 7, 3, 2, 1, 1, 1),  # stride 2, odd channels
    (1, 1, 17, 19, 1, 3, 1, 3, 2, 1),  # C = 1, dilation 2, padding 3
    (2, 6, 8, 10, 4, 3, 1, 1, 1, 2),  # groups 2
    (1, 64, 6, 5, 64, 3, 2, 2, 2, 64),  # depthwise, stride 2, dilation 2
    (1, 20, 2, 3, 17, 3, 1, 1, 1, 1),  # tiny map, prime channels
    # >= 32 channels per group, stride 1, >= 256 wide output columns: the CPU's shifted-GEMM forward (its backward
    # too where FCNKERN_CONV_SHIFTED=all forces it, below)
    (2, 37, 19, 17, 11, 3, 1, 1, 1, 1),
    (1, 64, 21, 16, 8, 3, 1, 2, 2, 2),  # ... with dilation 2 and 2 groups of 32
    (2, 48, 17, 23, 40, 2, 1, 0, 1, 1),  # ... an even kernel, no padding
    (1, 40, 17, 16, 36, 1, 1, 0, 1, 1),  # ... 1 x 1 (fc7, score layers): the weight is its own tap layout, viewed
]


def _case_id(case):
    n, c, h, w, cout, k, s, p, d, g = case
    return f"n{n}c{c}x{h}x{w}-k{cout}r{k}s{s}p{p}d{d}g{g}"


def _inputs(case, dtype, device, *key):
    n, c, h, w, cout, k, stride, padding, dilation, groups = case
    g = generator("conv", case, dtype, *key)
    x = torch.randn(n, c, h, w, generator=g)
    weight = torch.randn(cout, c // groups, k, k, generator=g) / (c // groups * k * k) ** 0.5
    bias = torch.randn(cout, generator=g) * 0.1
    return [t.to(device, dtype) for t in (x, weight, bias)], dict(
        stride=stride, padding=padding, dilation=dilation, groups=groups
    )


def _run(fn, tensors, upstream_seed):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(upstream_seed)).to(out.device, out.dtype)
    grads = torch.autograd.grad(out, leaves, g)
    return out.detach(), grads


def _assert_same_nonfinite(ours, ref):
    """(y, grads) from _run: NaN and inf in the same places as PyTorch's, the finite values close."""
    for a, b in zip((ours[0], *ours[1]), (ref[0], *ref[1]), strict=True):
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf())
        finite = b.isfinite()
        torch.testing.assert_close(a[finite], b[finite], rtol=1e-4, atol=1e-4)


def _reference(x, weight, bias, relu=True, **geometry):
    y = F.conv2d(x, weight, bias, **geometry)
    return F.relu(y) if relu else y


def _check(device, backend, dtype, tensors, geometry, relu=True):
    def ours(x, w, b):
        return conv2d_relu(x, w, b, relu=relu, backend=backend, **geometry)

    def torch_way(x, w, b):
        return _reference(x, w, b, relu, **geometry)

    out, grads = _run(ours, tensors, 7)
    assert out.dtype == dtype and out.shape == torch_way(*tensors).shape
    ref_out, ref_grads = _run(torch_way, [t.double() for t in tensors], 7)
    t_out, t_grads = _run(torch_way, tensors, 7)
    names = ("y", "dx", "dweight", "dbias")
    for name, a, t, r in zip(names, (out, *grads), (t_out, *t_grads), (ref_out, *ref_grads), strict=True):
        assert a.dtype == dtype and a.shape == r.shape, name
        if dtype == torch.float32:
            assert_fp32_ok(a, t, r, name)
        else:
            assert_low_precision_ok(a, t, r, dtype, name)


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION], ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_relu_conv2d_forward_and_backward(device, backend, dtype, case):
    tensors, geometry = _inputs(case, dtype, device)
    _check(device, backend, dtype, tensors, geometry)


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_without_relu_is_plain_conv(device, backend, dtype):
    tensors, geometry = _inputs(CASES[3], dtype, device)
    _check(device, backend, dtype, tensors, geometry, relu=False)


def _layout(x, weight, layout):
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last), weight
    if layout == "strided_view":  # every other column of a wider tensor, and a transposed-storage weight
        x = torch.cat([x, x.flip(-1)], dim=-1)[..., ::2]
        weight = weight.transpose(2, 3).contiguous().transpose(2, 3)
        if weight.is_contiguous():  # a 1 x 1 kernel: transposed storage is the same; every other input channel then
            weight = torch.cat([weight, weight.flip(1)], dim=1)[:, ::2]
        assert not x.is_contiguous() and not weight.is_contiguous()
    return x, weight


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
@pytest.mark.parametrize("layout", ["channels_last", "strided_view"])
@pytest.mark.parametrize("case", [CASES[1], CASES[9], CASES[10]], ids=_case_id)
def test_memory_formats_and_views(device, backend, layout, case):
    (x, weight, bias), geometry = _inputs(case, torch.float32, device, layout)
    x, weight = _layout(x, weight, layout)
    y = conv2d_relu(x, weight, bias, backend=backend, **geometry)
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    _check(device, backend, torch.float32, (x, weight, bias), geometry)


TRITON_PARAMS = [p for p in BACKENDS if p.values[1] == "triton"]


@pytest.mark.parametrize(("device", "backend"), TRITON_PARAMS)
@pytest.mark.parametrize("case", [CASES[5], CASES[4], CASES[6]], ids=_case_id)
def test_triton_64_bit_index_plan(monkeypatch, device, backend, case):
    """The Triton kernels' 64-bit pixel/offset arithmetic, which only tensors past 2**31 elements take by
    themselves, forced with FCNKERN_TRITON_WIDE_INDEX=1: flat (C = 1, padded and dilated) and per-tap reductions,
    stride 2, groups. Not the padding-100 case: its 44k output pixels cost 24 s in the interpreter."""
    monkeypatch.setenv("FCNKERN_TRITON_WIDE_INDEX", "1")
    tensors, geometry = _inputs(case, torch.float32, device, "wide")
    _check(device, backend, torch.float32, tensors, geometry)


def test_triton_index_plan_widens_past_32_bit_offsets():
    """32-bit arithmetic exactly where every offset fits: a view whose largest offset passes 2**31 (meta tensors,
    so nothing is allocated) takes the 64-bit plan, as does the environment override."""
    tl = pytest.importorskip("triton.language")
    small = torch.empty(8, 512, 64, 64, device="meta")
    huge = torch.empty_strided((2, 64, 128, 128), (2**31, 1, 8192, 64), device="meta")
    assert conv_relu._index_type(small) == tl.int32
    assert conv_relu._index_type(small, huge) == tl.int64
    with mock.patch.dict(os.environ, {"FCNKERN_TRITON_WIDE_INDEX": "1"}):
        assert conv_relu._index_type(small) == tl.int64


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided_view"])
@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION], ids=str)
@pytest.mark.parametrize("case", CASES[9:], ids=_case_id)
def test_cpu_shifted_backward_forced_on_small_shapes(monkeypatch, case, dtype, layout):
    """The CPU's shifted-GEMM backward, which it takes by itself from 256 channels per group (VGG's conv3_2 to
    conv5_3), forced onto the small stride-1 cases with FCNKERN_CONV_SHIFTED=all (and the register-blocked kernels,
    which would take these small layers first, off)."""
    require_backend("cpu")
    monkeypatch.setenv("FCNKERN_CONV_SHIFTED", "all")
    monkeypatch.setenv("FCNKERN_CONV_BLOCKED", "0")
    (x, weight, bias), geometry = _inputs(case, dtype, "cpu", layout)
    x, weight = _layout(x, weight, layout)
    _check("cpu", "cpu", dtype, (x, weight, bias), geometry)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_deep_layer_takes_its_default_paths(dtype):
    """A 256 -> 256 channel 3x3 layer on a 32 x 56 map: the CPU kernel's own choice (Winograd forward, dx and dW,
    from 1e8 multiply-adds per tap) without any forcing. CPU only: the Triton interpreter would spend minutes on it."""
    require_backend("cpu")
    case = (1, 256, 32, 56, 256, 3, 1, 1, 1, 1)
    tensors, geometry = _inputs(case, dtype, "cpu")
    _check("cpu", "cpu", dtype, tensors, geometry)
    if dtype == torch.float32:  # the default really is Winograd: its sums differ from the direct kernels' in the ulps
        direct = mock.patch.dict(os.environ, {"FCNKERN_CONV_WINOGRAD": "0"})
        with direct:
            y_direct = conv2d_relu(*tensors, backend="cpu", **geometry)
        y = conv2d_relu(*tensors, backend="cpu", **geometry)
        assert not torch.equal(y, y_direct)
        torch.testing.assert_close(y, y_direct, rtol=1e-4, atol=1e-5)


# Stride 1, dilation 1 (what the register-blocked kernels compute): RGB with padding 100 (dx then declines: its
# padding would be negative), a VGG layer, 7 x 7 to one pixel, 1 x 1, 2 groups, a tiny map, 37 channels on a prime map,
# an even kernel, rows wider than one 48-column step, and a map taller than wide in 2 groups (a frame strip of
# fcnkern.background, which the blocked kernels compute transposed).
BLOCKED_CASES = [
    *(CASES[i] for i in (0, 1, 2, 3, 6, 8, 9, 11)),
    (1, 5, 7, 61, 9, 3, 1, 1, 1, 1),
    (2, 6, 30, 4, 8, 3, 1, 1, 1, 2),
]
# The blocked kernels on each map as it is, and on every map taller than wide transposed (H and W swapped).
BLOCKED_ORIENTATION = {
    "blocked": {"FCNKERN_CONV_BLOCKED": "all", "FCNKERN_CONV_BLOCKED_TRANSPOSE": "0"},
    "blocked_transposed": {"FCNKERN_CONV_BLOCKED": "all", "FCNKERN_CONV_BLOCKED_TRANSPOSE": "all"},
}


@pytest.mark.parametrize("path", ["blocked", "blocked_transposed", "im2col"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided_view"])
@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION], ids=str)
@pytest.mark.parametrize("case", BLOCKED_CASES, ids=_case_id)
def test_cpu_stride1_paths_forced(monkeypatch, case, dtype, layout, path):
    """The CPU's two kernels for small stride-1 layers, each forced onto every such case: the register-blocked
    forward, dx and dW (which it takes by itself up to 64 channels, 3 x 3 and larger; on maps as they are and
    transposed), and im2col + GEMM (which it takes for the rest)."""
    require_backend("cpu")
    env = BLOCKED_ORIENTATION.get(path, {"FCNKERN_CONV_BLOCKED": "0"})
    if path == "im2col":
        env |= {"FCNKERN_CONV_SHIFTED": "0", "FCNKERN_CONV_WINOGRAD": "0", "FCNKERN_CONV_BATCHED": "0"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    (x, weight, bias), geometry = _inputs(case, dtype, "cpu", layout, "stride1-paths")
    x, weight = _layout(x, weight, layout)
    _check("cpu", "cpu", dtype, (x, weight, bias), geometry)


# Every case above, plus: 1 x 1 with 2 groups, C = 1, dilation 2 (no effect on a 1 x 1 kernel), fc7 and fc6 at 1/8
# width (8 images of 3 x 3 outputs: what takes the batch-wide GEMMs by default).
BATCHED_CASES = [
    *CASES,
    (2, 8, 3, 5, 6, 1, 1, 0, 1, 2),
    (3, 1, 4, 4, 3, 1, 1, 0, 1, 1),
    (2, 6, 3, 3, 5, 1, 1, 0, 2, 1),
    (8, 64, 3, 3, 64, 1, 1, 0, 1, 1),
    (8, 16, 9, 9, 32, 7, 1, 0, 1, 1),
]


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "plain"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided_view"])
@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION], ids=str)
@pytest.mark.parametrize("case", BATCHED_CASES, ids=_case_id)
def test_cpu_batch_wide_gemms_forced(monkeypatch, case, dtype, layout, relu):
    """The CPU's path for small maps (every image's pixels as columns of one GEMM per group: im2col of the batch,
    x itself for a 1 x 1 kernel, col2im for dx) forced onto every case, forward and all gradients against PyTorch.
    Forced, it also takes what the blocked and Winograd kernels would."""
    require_backend("cpu")
    for name, value in {
        "FCNKERN_CONV_BATCHED": "all",
        "FCNKERN_CONV_BLOCKED": "0",
        "FCNKERN_CONV_WINOGRAD": "0",
    }.items():
        monkeypatch.setenv(name, value)
    (x, weight, bias), geometry = _inputs(case, dtype, "cpu", layout, "batched")
    x, weight = _layout(x, weight, layout)
    _check("cpu", "cpu", dtype, (x, weight, bias), geometry, relu=relu)


@pytest.mark.parametrize("kernel", [1, 3], ids=["1x1", "3x3"])
def test_cpu_batch_wide_gemms_gradcheck_and_nan_outputs(monkeypatch, kernel):
    """The batch-wide GEMMs in float64 under gradcheck (a 1 x 1 kernel reads x as its columns, a 3 x 3 one with
    stride 2, padding and groups goes through im2col / col2im), and their ReLU mask on NaN outputs (PyTorch's rule:
    a NaN output passes its gradient, an output of exactly 0 passes none)."""
    require_backend("cpu")
    monkeypatch.setenv("FCNKERN_CONV_BATCHED", "all")
    g = generator("batched-gradcheck", kernel)
    x = torch.randn(2, 6, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 3, kernel, kernel, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    geometry = {"groups": 2} if kernel == 1 else {"groups": 2, "stride": 2, "padding": 1}
    assert torch.autograd.gradcheck(lambda *a: conv2d_relu(*a, backend="cpu", **geometry), (x, weight, bias))
    (x, weight, bias), geometry = _inputs(CASES[3], torch.float32, "cpu", "batched-nan")
    bias = bias.clone()
    bias[3], bias[5] = float("nan"), -1e6  # channel 3 NaN everywhere, channel 5 exactly 0 after the ReLU
    ours = _run(lambda *a: conv2d_relu(*a, backend="cpu", **geometry), (x, weight, bias), 5)
    ref = _run(lambda *a: _reference(*a, **geometry), (x, weight, bias), 5)
    assert ref[0][:, 3].isnan().all() and (ref[0][:, 5] == 0).all()
    _assert_same_nonfinite(ours, ref)


@pytest.mark.parametrize(
    "case, blocked",
    [
        ((2, 16, 20, 24, 16, 3, 1, 1, 1, 1), True),
        ((2, 64, 9, 9, 128, 7, 1, 0, 1, 1), False),
    ],
    ids=["16to16-3x3", "64to128-7x7"],
)
def test_cpu_layer_width_picks_blocked_or_gemm_by_default(case, blocked):
    """A 1/8-width VGG layer (16 -> 16 channels, 3 x 3): by default the CPU kernel runs it register-blocked, forward
    and backward, bit for bit what FCNKERN_CONV_BLOCKED=all gives, and not what im2col + GEMM gives (whose sums run
    in another order). A layer with more than 64 channels out (fc6 at 1/4 width) keeps the GEMMs forward (their wide
    N made them up to 2x faster than the blocked kernel), and its 128-deep dx and dW too: there the default is the
    GEMM path's result bit for bit (on this 3 x 3 output map, the batch-wide GEMMs)."""
    require_backend("cpu")
    tensors, geometry = _inputs(case, torch.float32, "cpu", "blocked-default")
    runs = {}
    for name, env in (
        ("default", {}),
        ("blocked", {"FCNKERN_CONV_BLOCKED": "all"}),
        ("im2col", {"FCNKERN_CONV_BLOCKED": "0"}),
    ):
        with mock.patch.dict(os.environ, env):
            out, grads = _run(lambda *a: conv2d_relu(*a, backend="cpu", **geometry), tensors, 3)
        runs[name] = (out, *grads)
    same, other = ("blocked", "im2col") if blocked else ("im2col", "blocked")
    assert all(torch.equal(a, b) for a, b in zip(runs["default"], runs[same], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(runs["default"], runs[other], strict=True))
    for a, b in zip(runs["default"], runs[other], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_cpu_blocked_kernels_transpose_thin_tall_maps_by_default():
    """A 16 -> 16 layer whose output is 38 x 3 (a frame strip): by default the blocked kernels compute it transposed,
    forward and backward, bit for bit what FCNKERN_CONV_BLOCKED_TRANSPOSE=all gives and not the untransposed sums
    (another order); a 20 x 12 map stays as it is (bit for bit FCNKERN_CONV_BLOCKED_TRANSPOSE=0)."""
    require_backend("cpu")
    for case, transposed in (((2, 16, 40, 5, 16, 3, 1, 0, 1, 1), True), ((2, 16, 20, 12, 16, 3, 1, 1, 1, 1), False)):
        tensors, geometry = _inputs(case, torch.float32, "cpu", "blocked-transposed-default")
        runs = {}
        for mode in ("default", "all", "0"):
            env = {} if mode == "default" else {"FCNKERN_CONV_BLOCKED_TRANSPOSE": mode}
            with mock.patch.dict(os.environ, env):
                out, grads = _run(lambda *a, geometry=geometry: conv2d_relu(*a, backend="cpu", **geometry), tensors, 3)
            runs[mode] = (out, *grads)
        same, other = ("all", "0") if transposed else ("0", "all")
        assert all(torch.equal(a, b) for a, b in zip(runs["default"], runs[same], strict=True))
        if transposed:
            assert not all(torch.equal(a, b) for a, b in zip(runs["default"], runs[other], strict=True))
        for a, b in zip(runs["default"], runs[other], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["default", "all"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cpu_blocked_transposed_non_square_kernel_and_padding(monkeypatch, mode, layout):
    """The transposed orientation swaps the kernel's and the padding's two axes too: a 3 x 2 kernel with padding
    (2, 0) over a 30 x 5 map (a 32 x 4 output) matches PyTorch forward and backward, in 2 groups."""
    require_backend("cpu")
    monkeypatch.setenv("FCNKERN_CONV_BLOCKED", "all")
    if mode == "all":
        monkeypatch.setenv("FCNKERN_CONV_BLOCKED_TRANSPOSE", "all")
    g = generator("blocked-transposed-non-square", layout)
    x = torch.randn(2, 6, 30, 5, generator=g)
    weight = torch.randn(8, 3, 3, 2, generator=g) / 3
    bias = torch.randn(8, generator=g) * 0.1
    x, weight = _layout(x, weight, layout)
    _check("cpu", "cpu", torch.float32, (x, weight, bias), {"padding": (2, 0), "groups": 2})


def _cpu_bf16_dot() -> bool:
    """Whether the CPU extension runs bf16 layers of the blocked path on AVX512-BF16 dot products here."""
    status = fcnkern._ext.load()
    return status.module is not None and bool(status.module.cpu_conv_bf16_dot())


def _require_cpu_bf16_dot() -> None:
    require_backend("cpu")
    if not _cpu_bf16_dot():
        pytest.skip("this CPU has no AVX512-BF16: its bf16 layers compute in fp32 (test_cpu_stride1_paths_forced)")


# The blocked cases, plus a 64-channel VGG layer and odd channel counts with a weight gradient on the blocked path
# (>= 8 channels in): the dot kernels pair input channels, an odd count's last pair padded with a zero channel.
BF16_DOT_CASES = [*BLOCKED_CASES, (2, 64, 33, 29, 64, 3, 1, 1, 1, 1), (1, 9, 20, 37, 13, 3, 1, 1, 1, 1)]


@pytest.mark.parametrize("path", ["blocked", "blocked_transposed"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided_view"])
@pytest.mark.parametrize("case", BF16_DOT_CASES, ids=_case_id)
def test_cpu_bf16_dot_kernels_match_pytorch(monkeypatch, case, layout, path):
    """bf16 layers on the register-blocked path run on AVX512-BF16 dot products (forward, dx, dW) where the CPU has
    them: forward and every gradient against PyTorch, judged like every bf16 result (against fp32, no worse than
    twice PyTorch's own bf16 error), on maps as they are and transposed."""
    _require_cpu_bf16_dot()
    for name, value in BLOCKED_ORIENTATION[path].items():
        monkeypatch.setenv(name, value)
    (x, weight, bias), geometry = _inputs(case, torch.bfloat16, "cpu", layout, "bf16-dot")
    x, weight = _layout(x, weight, layout)
    _check("cpu", "cpu", torch.bfloat16, (x, weight, bias), geometry)


@pytest.mark.parametrize(
    "case",
    [(2, 64, 33, 29, 64, 3, 1, 1, 1, 1), (8, 64, 9, 9, 512, 7, 1, 0, 1, 1)],
    ids=["blocked-64to64", "batch-wide-fc6"],
)
def test_cpu_bf16_dot_kernels_are_the_default_and_agree_with_fp32_math(case):
    """bf16 layers run on the dot-product kernels by default (FCNKERN_CONV_BF16_DOT unset): a 64 -> 64 layer on the
    register-blocked kernels, and fc6 of the main job's network (8 images, 64 -> 512 channels, 7 x 7 on 9 x 9) on the
    batch-wide GEMMs (gemm_bf16). Their sums run in another order than the fp32 kernels' (FCNKERN_CONV_BF16_DOT=0):
    some roundings of the results differ, every value is within a bf16 rounding or two of the other's (each product
    is exact in fp32 both ways), and both match PyTorch."""
    _require_cpu_bf16_dot()
    tensors, geometry = _inputs(case, torch.bfloat16, "cpu", "bf16-dot-default")
    runs = {}
    for mode in ("default", "0"):
        env = {} if mode == "default" else {"FCNKERN_CONV_BF16_DOT": mode}
        with mock.patch.dict(os.environ, env):
            assert _cpu_bf16_dot() == (mode == "default")
            out, grads = _run(lambda *a: conv2d_relu(*a, backend="cpu", **geometry), tensors, 3)
        runs[mode] = (out, *grads)
    assert not all(torch.equal(a, b) for a, b in zip(runs["default"], runs["0"], strict=True))
    for a, b in zip(runs["default"], runs["0"], strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=2**-7, atol=2**-8 * b.float().abs().max())
    _check("cpu", "cpu", torch.bfloat16, tensors, geometry)


def test_cpu_bf16_64_channel_layer_prefers_the_dot_kernels_to_winograd():
    """A bf16 64 -> 64 layer on a 160 x 160 map, which fp32 sends to Winograd (from 1e8 multiply-adds per tap): with
    the dot kernels here it takes the blocked path instead, forward and backward, bit for bit what
    FCNKERN_CONV_WINOGRAD=0 gives and not Winograd's sums (FCNKERN_CONV_WINOGRAD=all)."""
    _require_cpu_bf16_dot()
    tensors, geometry = _inputs((1, 64, 160, 160, 64, 3, 1, 1, 1, 1), torch.bfloat16, "cpu", "bf16-dot-winograd")
    runs = {}
    for mode in ("default", "0", "all"):
        env = {} if mode == "default" else {"FCNKERN_CONV_WINOGRAD": mode}
        with mock.patch.dict(os.environ, env):
            out, grads = _run(lambda *a: conv2d_relu(*a, backend="cpu", **geometry), tensors, 3)
        runs[mode] = (out, *grads)
    assert all(torch.equal(a, b) for a, b in zip(runs["default"], runs["0"], strict=True))
    assert not torch.equal(runs["default"][0], runs["all"][0])
    _check("cpu", "cpu", torch.bfloat16, tensors, geometry)
    fp32 = [t.float() for t in tensors]  # the premise: in fp32 the default is Winograd's result
    with mock.patch.dict(os.environ, {"FCNKERN_CONV_WINOGRAD": "all"}):
        y_winograd = conv2d_relu(*fp32, backend="cpu", **geometry)
    assert torch.equal(conv2d_relu(*fp32, backend="cpu", **geometry), y_winograd)


@pytest.mark.parametrize("dot", ["1", "0"])
def test_cpu_bf16_blocked_kernels_non_finite(monkeypatch, dot):
    """bf16 with inf in x and a NaN bias on the blocked path (dot products and fp32 math): NaN and inf where the fp32
    convolution of the same values has them (the dW kernels decline an inf x, whose wide-grid columns would make
    0 * inf; the NaN outputs pass their gradient), the finite values within bf16 rounding."""
    require_backend("cpu")
    monkeypatch.setenv("FCNKERN_CONV_BLOCKED", "all")
    monkeypatch.setenv("FCNKERN_CONV_BF16_DOT", dot)
    (x, weight, bias), geometry = _inputs(CASES[1], torch.bfloat16, "cpu", "bf16-non-finite")
    x, bias = x.clone(), bias.clone()
    x[0, 0, 1, 1], x[-1, -1, 2, 3] = float("inf"), float("-inf")
    bias[3] = float("nan")
    ours = _run(lambda *a: conv2d_relu(*a, backend="cpu", **geometry), (x, weight, bias), 5)
    ref = _run(lambda *a: _reference(*a, **geometry), [t.float() for t in (x, weight, bias)], 5)
    assert ref[0].isinf().any() and ref[0][:, 3].isnan().all() and ref[1][1].isinf().any()
    for a, b in zip((ours[0], *ours[1]), (ref[0], *ref[1]), strict=True):
        assert a.dtype == torch.bfloat16
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf())
        finite = b.isfinite()
        torch.testing.assert_close(a[finite].float(), b[finite], rtol=2**-7, atol=2**-7 * b[finite].abs().max())


def test_cpu_concurrent_calls_get_their_own_scratch():
    """The CPU kernels lend one kept scratch block to one call at a time (a second concurrent call gets a fresh
    buffer): Python threads running convolutions at once get exactly the results of running them one by one. Each
    geometry takes another path by default (the environment is the process's, so no forcing): register-blocked,
    im2col (stride 2), shifted GEMMs (1 x 1) and Winograd."""
    require_backend("cpu")
    cases = [
        (2, 16, 40, 44, 16, 3, 1, 1, 1, 1),
        (2, 16, 40, 44, 16, 3, 2, 1, 1, 1),
        (1, 64, 40, 40, 21, 1, 1, 0, 1, 1),
        (1, 256, 32, 56, 256, 3, 1, 1, 1, 1),
    ]
    jobs = [_inputs(case, torch.float32, "cpu", "concurrent") for case in cases]

    def run(job):
        tensors, geometry = job
        return [_run(lambda *a: conv2d_relu(*a, backend="cpu", **geometry), tensors, 5) for _ in range(4)]

    alone = [run(job) for job in jobs]
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        together = list(pool.map(run, jobs))
    for ours, ref in zip(together, alone, strict=True):
        for (out, grads), (ref_out, ref_grads) in zip(ours, ref, strict=True):
            assert torch.equal(out, ref_out) and all(map(torch.equal, grads, ref_grads))
    assert fcnkern.empty_cache() >= 0


# 3x3, stride 1, dilation 1 (what Winograd computes): a VGG layer, 2 groups, a map smaller than a tile with prime
# channels, 37 channels on a prime map, padding 0 and 2 (dx's padding 2 and 0).
WINOGRAD_CASES = [*(CASES[i] for i in (1, 6, 8, 9)), (1, 8, 6, 9, 5, 3, 1, 0, 1, 1), (2, 7, 5, 4, 6, 3, 1, 2, 1, 1)]


@pytest.mark.parametrize("tile", ["2", "4"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided_view"])
@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION], ids=str)
@pytest.mark.parametrize("case", WINOGRAD_CASES, ids=_case_id)
def test_cpu_winograd_forced_on_small_shapes(monkeypatch, case, dtype, layout, tile):
    """The CPU's Winograd F(m x m, 3 x 3) forward and dx, which it takes by itself from 64 channels per group,
    forced onto small shapes with FCNKERN_CONV_WINOGRAD=all, for both tile sizes (m = 2, the default, and 4)."""
    require_backend("cpu")
    monkeypatch.setenv("FCNKERN_CONV_WINOGRAD", "all")
    monkeypatch.setenv("FCNKERN_WINOGRAD_TILE", tile)
    (x, weight, bias), geometry = _inputs(case, dtype, "cpu", layout, "winograd")
    x, weight = _layout(x, weight, layout)
    _check("cpu", "cpu", dtype, (x, weight, bias), geometry)


@pytest.mark.parametrize("where", ["x", "weight", "grad"])
def test_cpu_winograd_leaves_non_finite_inputs_to_the_direct_kernels(monkeypatch, where):
    """inf in, inf out where PyTorch has it: Winograd's transforms would make inf - inf = NaN of an inf in x, the
    weight or dy, so such calls go to the direct kernels (NaN and inf where PyTorch has them: y, dx, dW)."""
    require_backend("cpu")
    monkeypatch.setenv("FCNKERN_CONV_WINOGRAD", "all")
    (x, weight, bias), geometry = _inputs(CASES[9], torch.float32, "cpu", "non-finite")
    x, weight = x.clone(), weight.clone()
    upstream = torch.randn(2, 11, 19, 17, generator=generator("non-finite-dy"))
    if where == "x":
        x[0, 0, 1, 1], x[-1, -1, 2, 3] = float("inf"), float("-inf")
    elif where == "weight":
        weight[0, 0, 1, 1] = float("inf")
    else:  # at two outputs the ReLU passes
        live = _reference(x, weight, bias, **geometry).flatten().gt(0).nonzero().flatten()
        upstream.view(-1)[live[[0, -1]]] = torch.tensor([float("inf"), float("-inf")])
    results = []
    for fn in (lambda *a: conv2d_relu(*a, backend="cpu", **geometry), lambda *a: _reference(*a, **geometry)):
        leaves = [t.clone().requires_grad_() for t in (x, weight)]
        y = fn(*leaves, bias)
        results.append((y.detach(), *torch.autograd.grad(y, leaves, upstream)))
    # Not dW of an inf dy, which the direct kernels' im2col GEMM multiplies by the padding's zeros (inf * 0 = NaN
    # where PyTorch skips them).
    keep = {"x": 3, "weight": 3, "grad": 2}[where]
    compared = [r[:keep] for r in results]
    assert any((~ref.isfinite()).any() for ref in compared[1])
    for ours, ref in zip(*compared, strict=True):
        assert torch.equal(ours.isnan(), ref.isnan()) and torch.equal(ours.isinf(), ref.isinf())
        finite = ref.isfinite()
        torch.testing.assert_close(ours[finite], ref[finite], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
def test_relu_boundary_outputs_of_exactly_zero_pass_no_gradient(device, backend):
    """A pre-activation of exactly 0 gets gradient 0, as in PyTorch (whose mask is y <= 0 -> 0)."""
    g = generator("boundary")
    x = torch.randn(2, 4, 6, 6, generator=g).to(device)
    weight = torch.randn(6, 4, 3, 3, generator=g).to(device)
    weight[::2] = 0  # channels 0, 2, 4: pre-activation exactly 0 (the bias is 0 there)
    bias = torch.zeros(6, device=device)
    bias[1::2] = 0.5
    for fn in (lambda *a: conv2d_relu(*a, padding=1, backend=backend), lambda *a: _reference(*a, padding=1)):
        out, (_dx, dw, db) = _run(fn, (x, weight, bias), 3)
        assert (out[:, ::2] == 0).all()
        assert (dw[::2] == 0).all() and (db[::2] == 0).all()
    ours = _run(lambda *a: conv2d_relu(*a, padding=1, backend=backend), (x, weight, bias), 3)[1]
    ref = _run(lambda *a: _reference(*a, padding=1), (x, weight, bias), 3)[1]
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the Triton interpreter
@pytest.mark.parametrize(("device", "backend"), BACKENDS)
@pytest.mark.parametrize("case", [CASES[1], CASES[9]], ids=_case_id)
def test_nan_and_inf_inputs_propagate_like_pytorch(device, backend, case):
    """NaN in, NaN out where PyTorch has it, forward and backward. A ReLU written as max(v, 0) turns NaN into 0 (the
    Triton kernel's tl.maximum did), which would hide a diverging network behind finite activations. In the backward,
    PyTorch's threshold_backward passes the gradient of a NaN output (NaN <= 0 is false); a mask written y > 0 blocked
    it, and gave a finite but different dx next to the NaN (every backend did before this test compared gradients)."""
    (x, weight, bias), geometry = _inputs(case, torch.float32, device, "nan")
    x = x.clone()
    x[0, 0, 1, 1], x[-1, -1, 2, 3] = float("nan"), float("inf")
    ours = _run(lambda *a: conv2d_relu(*a, backend=backend, **geometry), (x, weight, bias), 5)
    ref = _run(lambda *a: _reference(*a, **geometry), (x, weight, bias), 5)
    assert ref[0].isnan().any()
    _assert_same_nonfinite(ours, ref)


WIDE_GRID_PATHS = {
    "blocked": (BLOCKED_ORIENTATION["blocked"], CASES[1]),
    "blocked_transposed": (BLOCKED_ORIENTATION["blocked_transposed"], CASES[1]),
    "shifted": ({"FCNKERN_CONV_BLOCKED": "0", "FCNKERN_CONV_SHIFTED": "all"}, CASES[9]),
}


@pytest.mark.parametrize("path", WIDE_GRID_PATHS)
def test_cpu_weight_gradient_of_an_inf_input_at_every_position(monkeypatch, path):
    """An inf anywhere in x gives PyTorch's inf / NaN pattern in every gradient. The blocked and shifted dW run on a
    wide grid whose extra columns multiply a zero dy' by real x values, so they turned +-inf into NaN (0 * inf) at
    89 of 303 (blocked) and 20 of 170 (shifted) positions, before such an x went to the GEMM path."""
    require_backend("cpu")
    env, case = WIDE_GRID_PATHS[path]
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    (x0, weight, bias), geometry = _inputs(case, torch.float32, "cpu", "inf-positions")
    for ih in range(x0.shape[2]):
        for iw in range(x0.shape[3]):
            x = x0.clone()
            x[-1, -1, ih, iw] = float("inf")
            ours = _run(lambda *a: conv2d_relu(*a, backend="cpu", **geometry), (x, weight, bias), 5)
            ref = _run(lambda *a: _reference(*a, **geometry), (x, weight, bias), 5)
            assert ref[1][1].isinf().any()
            _assert_same_nonfinite(ours, ref)


@pytest.mark.parametrize(
    "path",
    [
        {"FCNKERN_CONV_BLOCKED": "0"},
        {"FCNKERN_CONV_SHIFTED": "all", "FCNKERN_CONV_BLOCKED": "0"},
        {"FCNKERN_CONV_WINOGRAD": "all"},
        {"FCNKERN_CONV_BLOCKED": "all"},
    ],
    ids=["im2col", "shifted", "winograd", "blocked"],
)
def test_cpu_nan_outputs_pass_their_gradient_on_every_path(monkeypatch, path):
    """A NaN bias makes a whole output channel NaN from finite x, weight and dy, so every CPU backward path (im2col,
    shifted GEMMs, Winograd, which declines only non-finite x, weight or dy, register-blocked) runs with NaN outputs:
    each must pass their gradient as PyTorch does, leaving dx, dW and the other channels' db finite."""
    require_backend("cpu")
    for name, value in path.items():
        monkeypatch.setenv(name, value)
    (x, weight, bias), geometry = _inputs(CASES[9], torch.float32, "cpu", "nan-bias")
    bias = bias.clone()
    bias[3] = float("nan")
    ours = _run(lambda *a: conv2d_relu(*a, backend="cpu", **geometry), (x, weight, bias), 5)
    ref = _run(lambda *a: _reference(*a, **geometry), (x, weight, bias), 5)
    assert ref[0][:, 3].isnan().all() and ref[1][0].isfinite().all()
    _assert_same_nonfinite(ours, ref)


@pytest.mark.parametrize(
    "case",
    [
        (3, 64, 39, 51, 2, 3, 1, 2, 2, 2),  # dilated, 2 groups of one output channel: 288 x 1989 per band
        (2, 16, 101, 97, 1, 3, 2, 1, 1, 1),  # stride 2, a single output channel: 144 x 2499
    ],
    ids=_case_id,
)
def test_cpu_one_output_channel_weight_gradient(case):
    """The im2col weight gradient of a group with one output channel is a one-row GEMM, 1 x (pixels of a band) @
    (pixels x C/G.R.S), accumulated over bands. oneDNN's in-place matmul corrupted the heap on such products from
    about 1100 pixels (the process died in free() within a few calls), so they run on MKL; three calls, each
    checked, to give a corruption the chance to show."""
    require_backend("cpu")
    (x, weight, bias), geometry = _inputs(case, torch.float32, "cpu", "one-row")
    for _ in range(3):
        _check("cpu", "cpu", torch.float32, [x, weight, bias], geometry)


# Frame strips and small maps of wide layers (fcnkern.background's pieces of conv3-conv5): one im2col block per call,
# whose copies, epilogue and col2im the CPU kernel spreads over threads itself (the tests' other maps are too small
# to be split); 90 channels keep them off the register-blocked and Winograd kernels.
IM2COL_ROW_SPLIT_CASES = [
    (1, 90, 157, 5, 96, 3, 1, 0, 1, 1),  # a tall strip: runs of 3 values
    (1, 90, 6, 131, 70, 3, 1, 1, 1, 1),  # a wide strip, padding 1
    (2, 96, 29, 23, 90, 3, 1, 2, 2, 2),  # dilation 2, 2 groups
]


@pytest.mark.parametrize("case", IM2COL_ROW_SPLIT_CASES, ids=_case_id)
def test_cpu_im2col_rows_split_over_threads(case):
    require_backend("cpu")
    (x, weight, bias), geometry = _inputs(case, torch.float32, "cpu", "row-split")
    _check("cpu", "cpu", torch.float32, [x, weight, bias], geometry)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("case", [CASES[0], CASES[4], CASES[6]], ids=_case_id)
def test_gradcheck_float64(backend, case):
    require_backend(backend)
    _n, c, h, w, cout, k, stride, padding, dilation, groups = case
    padding = min(padding, 2)  # the padding-100 case would spend the gradcheck on zeros
    g = generator("gradcheck", case)
    x = torch.randn(1, c, min(h, 5), min(w, 6), generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(min(cout, 4), c // groups, k, k, generator=g, dtype=torch.float64) * 0.5
    weight = weight[: (min(cout, 4) // groups) * groups].clone().requires_grad_()
    bias = torch.randn(weight.shape[0], generator=g, dtype=torch.float64, requires_grad=True)

    def fn(x, w, b):
        return conv2d_relu(x, w, b, stride, padding, dilation, groups, backend=backend)

    assert torch.autograd.gradcheck(fn, (x, weight, bias), fast_mode=interpreted(backend))


@pytest.mark.parametrize("shifted", ["default", "all"])
@pytest.mark.parametrize(("kernel", "padding", "height"), [(3, 1, 15), (1, 0, 16)], ids=["3x3", "1x1"])
def test_gradcheck_float64_shifted_path(monkeypatch, shifted, kernel, padding, height):
    """gradcheck on a geometry the CPU kernel runs as shifted GEMMs (stride 1, >= 32 channels per group, >= 256
    wide output columns), which the shrunken cases above do not reach: the forward, and with "all" the backward.
    The 1 x 1 kernel without padding reads a contiguous x as it lies and writes dx in place (no padded copies)."""
    require_backend("cpu")
    monkeypatch.setenv("FCNKERN_CONV_SHIFTED", shifted if shifted != "default" else "1")
    g = generator("gradcheck-shifted", kernel)
    x = torch.randn(2, 32, height, 16, generator=g, dtype=torch.float64, requires_grad=True)
    weight = (torch.randn(3, 32, kernel, kernel, generator=g, dtype=torch.float64) / 17).requires_grad_()
    bias = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)

    def conv(*args):
        return conv2d_relu(*args, padding=padding, backend="cpu")

    # The shape this path needs has 2 x 32 x height x 16 inputs: a forward per input element and a backward per
    # output element in full mode (86 s for the four cases); fast mode checks random projections of the Jacobian.
    assert torch.autograd.gradcheck(conv, (x, weight, bias), fast_mode=True)


@pytest.mark.parametrize("tile", ["2", "4"])
@pytest.mark.parametrize(("padding", "groups"), [(1, 1), (0, 2), (2, 1)])
def test_gradcheck_float64_winograd(monkeypatch, tile, padding, groups):
    """gradcheck through the Winograd forward and dx (in float64: double transforms and GEMMs), forced onto a small
    map with FCNKERN_CONV_WINOGRAD=all; dW comes from the direct kernels."""
    require_backend("cpu")
    monkeypatch.setenv("FCNKERN_CONV_WINOGRAD", "all")
    monkeypatch.setenv("FCNKERN_WINOGRAD_TILE", tile)
    g = generator("gradcheck-winograd", tile, padding, groups)
    x = torch.randn(2, 4, 7, 6, generator=g, dtype=torch.float64, requires_grad=True)
    weight = (torch.randn(6, 4 // groups, 3, 3, generator=g, dtype=torch.float64) / 4).requires_grad_()
    bias = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)

    def conv(*args):
        return conv2d_relu(*args, padding=padding, groups=groups, backend="cpu")

    assert torch.autograd.gradcheck(conv, (x, weight, bias))


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
def test_only_requested_gradients_are_computed(device, backend):
    (x, weight, _bias), geometry = _inputs(CASES[1], torch.float32, device)
    weight.requires_grad_()
    y = conv2d_relu(x, weight, None, backend=backend, **geometry)
    (dw,) = torch.autograd.grad(y.sum(), [weight])
    ref = torch.autograd.grad(_reference(x, weight, None, **geometry).sum(), [weight])[0]
    torch.testing.assert_close(dw, ref, rtol=1e-4, atol=1e-4)
    assert x.grad is None


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@split_examples(2)
@given(
    n=st.integers(1, 2),
    c_g=st.integers(1, 9),
    k_g=st.integers(1, 9),
    groups=st.integers(1, 3),
    h=st.integers(1, 12),
    w=st.integers(1, 12),
    k=st.sampled_from([1, 2, 3, 5]),
    stride=st.integers(1, 3),
    padding=st.integers(0, 3),
    dilation=st.integers(1, 2),
)
def test_property_random_geometries(n, c_g, k_g, groups, h, w, k, stride, padding, dilation, backend):
    require_backend(backend)
    if conv_relu.conv_output_size(h, k, stride, padding, dilation) < 1 or (
        conv_relu.conv_output_size(w, k, stride, padding, dilation) < 1
    ):
        with pytest.raises(ValueError, match="smaller than the dilated kernel"):
            conv2d_relu(torch.randn(n, c_g * groups, h, w), torch.randn(k_g * groups, c_g, k, k), padding=padding,
                        stride=stride, dilation=dilation, groups=groups, backend="torch")  # fmt: skip
        return
    case = (n, c_g * groups, h, w, k_g * groups, k, stride, padding, dilation, groups)
    tensors, geometry = _inputs(case, torch.float32, "cpu")
    _check("cpu", backend, torch.float32, tensors, geometry)


@pytest.mark.parametrize("shifted", ["default", "all", "winograd", "blocked"])
@given(
    n=st.integers(1, 2),
    c_g=st.integers(32, 40),
    k_g=st.integers(1, 12),
    groups=st.integers(1, 2),
    h=st.integers(1, 24),
    w=st.integers(1, 24),
    k=st.sampled_from([1, 2, 3]),
    padding=st.integers(0, 3),
    dilation=st.integers(1, 2),
)
def test_property_random_stride1_geometries_cpu(shifted, n, c_g, k_g, groups, h, w, k, padding, dilation):
    """Stride 1 with >= 32 channels per group: where the CPU kernel switches between im2col and shifted GEMMs (at
    256 wide output columns), over random maps, kernels, paddings and dilations; "all" takes the shifted backward
    too, "winograd" the Winograd forward and dx wherever they apply (3 x 3, dilation 1), "blocked" the
    register-blocked forward, dx and dW wherever they apply (dilation 1; dx with padding < kernel)."""
    require_backend("cpu")
    assume(min(conv_relu.conv_output_size(s, k, 1, padding, dilation) for s in (h, w)) >= 1)
    case = (n, c_g * groups, h, w, k_g * groups, k, 1, padding, dilation, groups)
    tensors, geometry = _inputs(case, torch.float32, "cpu")
    # not monkeypatch: Hypothesis runs many examples per function-scoped fixture
    env = {"FCNKERN_CONV_SHIFTED": "all" if shifted == "all" else "1"}
    env["FCNKERN_CONV_WINOGRAD"] = "all" if shifted == "winograd" else "0"
    env["FCNKERN_CONV_BLOCKED"] = "all" if shifted == "blocked" else "0"
    with mock.patch.dict(os.environ, env):
        _check("cpu", "cpu", torch.float32, tensors, geometry)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_opcheck_and_compile_fullgraph(backend):
    require_backend(backend)
    (x, weight, bias), _ = _inputs(CASES[1], torch.float32, "cpu", "opcheck")
    op = torch.ops.fcnkern.triton_conv2d_relu if backend == "triton" else torch.ops.fcnkern.conv2d_relu
    args = (x, weight.requires_grad_(), bias.requires_grad_(), [1, 1], [1, 1], [1, 1], 1, True)
    torch.library.opcheck(op, args)
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: conv2d_relu(*a, padding=1, backend=backend), fullgraph=True)
    torch.testing.assert_close(compiled(x, weight, bias), _reference(x, weight, bias, padding=1))


def test_module_is_a_drop_in_for_conv2d():
    conv = nn.Conv2d(5, 7, 3, stride=2, padding=1, dilation=1, bias=True)
    layer = Conv2dReLU(5, 7, 3, stride=2, padding=1)
    assert layer.state_dict().keys() == conv.state_dict().keys()
    layer.load_state_dict(conv.state_dict())
    x = torch.randn(2, 5, 9, 8)
    torch.testing.assert_close(layer(x), F.relu(conv(x)))
    wrapped = Conv2dReLU.from_conv(conv, relu=False)
    assert wrapped.weight is conv.weight
    torch.testing.assert_close(wrapped(x), conv(x))
    assert "relu=False" in repr(wrapped)


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
@pytest.mark.parametrize(
    ("padding", "kernel", "dilation"),
    [("same", 3, 1), ("same", 2, 1), ("same", 4, 3), ("same", 3, 2), ("valid", 3, 1)],
    ids=["same-k3", "same-k2-odd-total", "same-k4d3-odd-total", "same-k3d2", "valid"],
)
def test_string_padding_matches_conv2d(device, backend, padding, kernel, dilation):
    """F.conv2d's padding="same" (where the total d (k - 1) is odd, the extra zero goes right/bottom) and "valid"."""
    case = (2, 5, 9, 8, 6, kernel, 1, 0, dilation, 1)
    tensors, geometry = _inputs(case, torch.float32, device)
    with warnings.catch_warnings():  # PyTorch warns that its own even-kernel "same" pads a copy; so does this
        warnings.simplefilter("ignore", UserWarning)
        _check(device, backend, torch.float32, tensors, dict(geometry, padding=padding))


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
def test_unbatched_input_like_conv2d(device, backend):
    tensors, geometry = _inputs(CASES[1], torch.float32, device)
    tensors[0] = tensors[0][1]  # C x H x W, as F.conv2d takes it
    _check(device, backend, torch.float32, tensors, geometry)


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("padding", [1, (2, 1), "same"], ids=str)
def test_module_padding_modes_match_conv2d(device, backend, padding_mode, padding):
    conv = nn.Conv2d(5, 7, 3, padding=padding, padding_mode=padding_mode).to(device)
    layer = Conv2dReLU.from_conv(conv, backend=backend)
    x = torch.randn(2, 5, 9, 8, generator=generator("padding_mode", padding_mode, padding)).to(device)
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours, y_ref = layer(x_ours), F.relu(conv(x_ref))
    torch.testing.assert_close(y_ours, y_ref)
    g = torch.randn(y_ref.shape, generator=generator("padding_mode upstream")).to(device)
    grads_ours = torch.autograd.grad(y_ours, (x_ours, conv.weight, conv.bias), g)
    grads_ref = torch.autograd.grad(y_ref, (x_ref, conv.weight, conv.bias), g)
    for a, b in zip(grads_ours, grads_ref, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(x=torch.randn(3, 5)), ValueError, "4-d"),
        (dict(x=torch.randn(2, 5, 5)), ValueError, "does not fit"),  # unbatched, with the wrong channel count
        (dict(padding="full"), ValueError, "'valid', 'same'"),
        (dict(padding="same", stride=2), ValueError, "strided"),
        (dict(x=torch.randint(0, 3, (1, 3, 5, 5))), TypeError, "float32"),
        (dict(weight=torch.randn(4, 3, 3, 3, dtype=torch.float64)), ValueError, "weight is torch.float64"),
        (dict(weight=torch.randn(4, 2, 3, 3)), ValueError, "does not fit"),
        (dict(bias=torch.randn(5)), ValueError, "bias must be a vector of 4"),
        (dict(stride=0), ValueError, "stride >= 1"),
        (dict(padding=-1), ValueError, "padding >= 0"),
        (dict(stride=(1, 2, 3)), TypeError, "pair of ints"),
        (dict(x=torch.randn(1, 3, 2, 2)), ValueError, "smaller than the dilated kernel"),
        (dict(groups=2), ValueError, "does not fit"),
        # PyTorch gives a result with the wrong channel count for the first and raises for the second: no channels
        # are an error on every backend (the CPU kernels divided by zero on the first).
        (dict(x=torch.randn(1, 0, 5, 5), weight=torch.randn(4, 0, 3, 3)), ValueError, "no input channels"),
        (dict(weight=torch.randn(0, 3, 3, 3)), ValueError, "no output channels"),
    ],
)
def test_bad_input_gives_clear_errors(kwargs, error, match):
    args = dict(x=torch.randn(1, 3, 5, 5), weight=torch.randn(4, 3, 3, 3), bias=None)
    args.update(kwargs)
    for backend in ("torch", "cpu"):
        with pytest.raises(error, match=match):
            conv2d_relu(**args, backend=backend)


def test_cpp_op_rejects_weights_without_channels():
    """Called directly, below the Python checks, the C++ op raises instead of dividing by zero."""
    require_backend("cpu")
    for x, w in (
        (torch.randn(1, 0, 5, 5), torch.randn(4, 0, 3, 3)),
        (torch.randn(1, 3, 5, 5), torch.randn(0, 3, 3, 3)),
    ):
        with pytest.raises(ValueError, match="no input or output channels"):
            torch.ops.fcnkern.conv2d_relu(x, w, None, [1, 1], [0, 0], [1, 1], 1, True)


def test_missing_backend_is_an_error():
    """The cuda backend on CPU tensors (or on a build without CUDA) is a clear error, never a silent fallback."""
    x, w = torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3)
    with pytest.raises(BackendUnavailableError, match="backend 'cuda'"):
        conv2d_relu(x, w, backend="cuda")
