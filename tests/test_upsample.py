"""Upsampling with the crop folded in: meaning (ConvTranspose2d + slicing), the bilinear kernel's properties, the
module's state_dict compatibility with nn.ConvTranspose2d, and input validation. Kernel backends plug into the
same parametrisation as they land; until then they are skipped with that reason."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    LOW_PRECISION,
    assert_fp32_ok,
    assert_low_precision_ok,
    device_backend_params,
    draw_window,
    generator,
    interpreted,
    require_backend,
    split_examples,
)
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import fcnkern
from fcnkern import BackendUnavailableError, bilinear_upsample_crop, bilinear_weight, geometry, upsample
from fcnkern import upsample_crop as upsample_crop_fn


def _backend_params(op: str = "upsample_crop") -> list:
    return device_backend_params(op, upsample.IMPLEMENTED[op], issue=4)


def _reference(x, weight, stride, crop, out_size, bias=None, groups=1):
    full = F.conv_transpose2d(x, weight, bias, stride, groups=groups)
    return full[:, :, crop[0] : crop[0] + out_size[0], crop[1] : crop[1] + out_size[1]]


# (channels, factor, kernel, groups, h, w, crop, out_size): FCN geometries and odd ones.
CASES = [
    # FCN-32s's upscore geometry (k64 s32 crop 19), per class; 3 classes, not 21: the interpreter spent 40 s per
    # dtype on its 21 identical groups (21 classes, per class, are in the cases below)
    (3, 32, 64, 3, 3, 2, (19, 19), (37, 5)),
    (21, 2, 4, 1, 5, 7, (0, 0), (12, 16)),  # FCN-8s upscore2, full mixing
    (21, 2, 4, 21, 6, 6, (5, 5), (7, 7)),
    (21, 8, 16, 21, 4, 3, (31, 2), (3, 29)),  # upscore8 crop
    (1, 4, 8, 1, 5, 5, (3, 1), (13, 17)),
    (5, 16, 32, 5, 2, 3, (9, 0), (23, 47)),
    (6, 3, 5, 2, 4, 4, (1, 2), (11, 12)),  # odd kernel, groups 2
    (150, 2, 4, 150, 3, 2, (1, 1), (5, 3)),  # ADE20K-sized class count, per-class
    # FCN-32s's learned layer with full mixing: the cell GEMM at stride 32. 9 classes, not 21: its 1024 output
    # rows per class made the interpreter take 40-54 s per dtype; 21 classes fully mixed are tested at stride 2
    (9, 32, 64, 1, 2, 2, (19, 7), (37, 29)),
    (16, 3, 7, 2, 4, 5, (2, 1), (13, 11)),  # cell GEMM, groups 2, kernel not a multiple of the stride
    # cell GEMMs with one tap per cell (a kernel no larger than the stride), whose rearranged weight the Triton path
    # read as row-major while it was a strided view: kernel = stride; kernel < stride, a window whose rows no tap
    # reaches (bias only)
    (16, 4, 4, 1, 3, 5, (1, 2), (9, 14)),
    (21, 16, 3, 1, 4, 5, (20, 5), (8, 25)),
]


def _layout(x: torch.Tensor, layout: str, g: torch.Generator) -> torch.Tensor:
    """x as NCHW, channels_last, or a non-contiguous window of a larger tensor (same values)."""
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "cropped_view":
        n, c, h, w = x.shape
        big = torch.randn(n, c, h + 3, w + 2, generator=g).to(x.device, x.dtype)
        big[:, :, 1 : 1 + h, 2 : 2 + w] = x
        return big[:, :, 1 : 1 + h, 2 : 2 + w]
    return x


def _run_with_grads(fn, upstream, *args):
    args = [a.detach().clone().requires_grad_() for a in args]
    out = fn(*args)
    grads = torch.autograd.grad(out, args, upstream.to(out.dtype))
    return out.detach(), grads


def _check_learned(device, backend, dtype, case, layout):
    c, f, k, groups, h, w, crop, size = case
    g = generator("upsample", case, dtype, layout)
    x = _layout(torch.randn(2, c, h, w, generator=g).to(device, dtype), layout, g)
    weight = torch.randn(c, c // groups, k, k, generator=g).to(device, dtype)
    bias = torch.randn(c, generator=g).to(device, dtype)
    upstream = _layout(torch.randn(2, c, *size, generator=g).to(device, dtype), layout, g)

    ours, ours_g = _run_with_grads(
        lambda a, b, cc: upsample_crop_fn(a, b, f, crop, size, cc, groups, backend=backend), upstream, x, weight, bias
    )
    torch_way, torch_g = _run_with_grads(lambda a, b, cc: _reference(a, b, f, crop, size, cc, groups), upstream,
                                         x, weight, bias)  # fmt: skip
    ref, ref_g = _run_with_grads(lambda a, b, cc: _reference(a, b, f, crop, size, cc, groups), upstream.double(),
                                 x.double(), weight.double(), bias.double())  # fmt: skip
    assert ours.shape == (2, c, *size) and ours.dtype == dtype
    if layout == "channels_last":
        assert ours.is_contiguous(memory_format=torch.channels_last)
    for what, got, theirs, want in zip(("out", "dx", "dweight", "dbias"), (ours, *ours_g), (torch_way, *torch_g),
                                       (ref, *ref_g), strict=True):  # fmt: skip
        assert got.dtype == dtype, what
        if dtype == torch.float32:
            assert_fp32_ok(got, theirs, want, what)
        else:
            assert_low_precision_ok(got, theirs, want, dtype, what)


@pytest.mark.parametrize(("device", "backend"), _backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"c{c[0]}f{c[1]}k{c[2]}g{c[3]}crop{c[6][0]}")
def test_upsample_crop_matches_conv_transpose_and_slice(device, backend, dtype, case):
    """Forward and all three gradients against conv_transpose2d + slicing: fp32 tight, fp16/bf16 no worse than
    twice PyTorch's own error in that dtype, both judged against float64."""
    _check_learned(device, backend, dtype, case, "nchw")


@pytest.mark.parametrize(("device", "backend"), _backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["channels_last", "cropped_view"])
@pytest.mark.parametrize("case", [CASES[1], CASES[6]], ids=lambda c: f"c{c[0]}f{c[1]}k{c[2]}g{c[3]}")
def test_upsample_crop_layouts(device, backend, dtype, layout, case):
    _check_learned(device, backend, dtype, case, layout)


@pytest.mark.parametrize(("device", "backend"), [p for p in _backend_params() if p.values[1] == "triton"])
@pytest.mark.parametrize("case", [CASES[1], CASES[4], CASES[6]], ids=lambda c: f"c{c[0]}f{c[1]}k{c[2]}g{c[3]}")
def test_triton_64_bit_index_plan(monkeypatch, device, backend, case):
    """The learned path's 64-bit pixel arithmetic, which only tensors past 2**31 elements take by themselves, forced
    with FCNKERN_TRITON_WIDE_INDEX=1: tensor-core and CUDA-core variants, an odd kernel with groups."""
    monkeypatch.setenv("FCNKERN_TRITON_WIDE_INDEX", "1")
    _check_learned(device, backend, torch.float32, case, "nchw")


@pytest.mark.parametrize(("device", "backend"), _backend_params())
def test_diagonal_learned_weight_equals_bilinear_path(device, backend):
    """A learnable layer whose weight is still FCN's diagonal bilinear one gives the fixed bilinear result."""
    c, f, crop, size = 21, 4, (3, 5), (17, 14)
    x = torch.randn(2, c, 5, 4, generator=generator("diag-learned")).to(device)
    learned = upsample_crop_fn(x, bilinear_weight(c, 2 * f).to(device), f, crop, size, backend=backend)
    fixed = bilinear_upsample_crop(x, f, crop, size, backend="torch")
    torch.testing.assert_close(learned, fixed, rtol=1e-5, atol=1e-5)


def test_bilinear_kernel_is_fcns_filter():
    expected = torch.tensor([0.25, 0.75, 0.75, 0.25])
    torch.testing.assert_close(fcnkern.bilinear_kernel(4), torch.outer(expected, expected))
    odd = torch.tensor([1 / 3, 2 / 3, 1.0, 2 / 3, 1 / 3])
    torch.testing.assert_close(fcnkern.bilinear_kernel(5), torch.outer(odd, odd))


@pytest.mark.parametrize("factor", [2, 4, 8, 16, 32])
def test_bilinear_upsampling_reproduces_constants_and_ramps(factor):
    """Interpolation properties, independent of how the kernel is written: away from the borders a constant image
    stays constant, and a ramp x is sampled exactly at the input coordinate the geometry module assigns."""
    n = 6
    ramp = torch.arange(n, dtype=torch.float64).view(1, 1, n, 1).expand(1, 1, n, n)
    ones = torch.ones(1, 1, n, n, dtype=torch.float64)
    size = (n - 2) * factor
    crop = (factor + factor // 2, factor + factor // 2)  # the interior, away from the zero padding
    up_ones = bilinear_upsample_crop(ones, factor, crop, (size - factor, size - factor))
    torch.testing.assert_close(up_ones, torch.ones_like(up_ones))
    up = bilinear_upsample_crop(ramp, factor, crop, (size - factor, size - factor))[0, 0, :, 0]
    # Sampled where fcnkern.geometry says output row y sits on the input: x = (y + crop - (k - 1) / 2) / factor.
    m = geometry.Layer("upscore", "deconv", 2 * factor, factor).coord_map()
    rows = torch.arange(up.numel(), dtype=torch.float64) + crop[0]
    torch.testing.assert_close(up, float(m.scale) * rows + float(m.shift))


BILINEAR_CASES = [  # (channels, factor, h, w, crop, out_size): FCN-32s/8s finals, crop 0, primes, C = 1
    (21, 32, 3, 2, (19, 19), (41, 29)),
    (21, 8, 5, 4, (31, 3), (7, 23)),
    (21, 2, 4, 5, (0, 0), (10, 12)),
    (1, 4, 6, 3, (1, 2), (23, 13)),
    (150, 16, 2, 2, (9, 0), (17, 31)),
    (2, 2, 3, 37, (1, 3), (5, 70)),  # input rows wider than 16: the backward's wide width-pass tiles
    (2, 40, 2, 20, (5, 19), (61, 301)),  # 2f = 80 taps: the width pass loops over tap chunks; rows past 256 too
]


# Every dtype in NCHW; the other layouts (strides the kernels must follow) in fp32 and bf16, as the learned path's
# layout test: fp16 loads and stores as bf16 does.
BILINEAR_DTYPE_LAYOUTS = [(dtype, "nchw") for dtype in (torch.float32, *LOW_PRECISION)] + [
    (dtype, layout) for layout in ("channels_last", "cropped_view") for dtype in (torch.float32, torch.bfloat16)
]


# The interpreter takes about 10 s a call on the two largest cases (150 channels; 80 taps over rows of 301): there
# they run every dtype in NCHW only, and the other layouts are checked on the five smaller cases.
_INTERPRETER_NCHW_ONLY = {BILINEAR_CASES[4], BILINEAR_CASES[6]}


def _bilinear_params() -> list:
    params = []
    for pair in _backend_params("bilinear_upsample_crop"):
        device, backend = pair.values
        for case in BILINEAR_CASES:
            for dtype, layout in BILINEAR_DTYPE_LAYOUTS:
                if layout != "nchw" and case in _INTERPRETER_NCHW_ONLY and interpreted(backend, device):
                    continue
                case_id = f"c{case[0]}f{case[1]}crop{case[4][0]}-{dtype}-{layout}-{pair.id}"
                params.append(pytest.param(device, backend, dtype, layout, case, marks=pair.marks, id=case_id))
    return params


@pytest.mark.parametrize(("device", "backend", "dtype", "layout", "case"), _bilinear_params())
def test_bilinear_path_equals_diagonal_full_layer(device, backend, dtype, layout, case):
    """Forward and gradient equal nn.ConvTranspose2d(C, C, 2f, f) with FCN's diagonal bilinear weight, then the
    crop: fp32 tight, fp16/bf16 no worse than twice that layer's own error in the dtype, judged in float64."""
    _check_bilinear(device, backend, dtype, case, layout)


def _check_bilinear(device, backend, dtype, case, layout):
    c, factor, h, w, crop, size = case
    k = 2 * factor
    g = generator("diag", case, dtype, layout)
    x = _layout(torch.randn(2, c, h, w, generator=g).to(device, dtype), layout, g)
    upstream = torch.randn(2, c, *size, generator=g).to(device, dtype)
    weight = bilinear_weight(c, k, torch.float64).to(device)
    ours, (ours_g,) = _run_with_grads(lambda a: bilinear_upsample_crop(a, factor, crop, size, backend=backend),
                                      upstream, x)  # fmt: skip
    torch_way, (torch_g,) = _run_with_grads(lambda a: _reference(a, weight.to(dtype), factor, crop, size),
                                            upstream, x)  # fmt: skip
    ref, (ref_g,) = _run_with_grads(lambda a: _reference(a, weight, factor, crop, size), upstream.double(),
                                    x.double())  # fmt: skip
    assert ours.shape == ref.shape and ours.dtype == dtype and ours_g.dtype == dtype
    for what, got, theirs, want in (("out", ours, torch_way, ref), ("dx", ours_g, torch_g, ref_g)):
        if dtype == torch.float32:
            assert_fp32_ok(got, theirs, want, what)
        else:
            assert_low_precision_ok(got, theirs, want, dtype, what)


@pytest.mark.parametrize(("device", "backend"), _backend_params("bilinear_upsample_crop"))
def test_bilinear_gradcheck_float64(device, backend):
    x = torch.randn(2, 3, 3, 4, generator=generator("gc-bil"), dtype=torch.float64).to(device).requires_grad_()
    fn = lambda x: bilinear_upsample_crop(x, 3, (2, 1), (7, 9), backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,), fast_mode=interpreted(backend, device))


def test_bilinear_cpu_op_registration():
    require_backend("cpu")
    x = torch.randn(2, 3, 4, 5, generator=generator("opcheck-bil"))
    torch.library.opcheck(torch.ops.fcnkern.bilinear_upsample_crop.default, (x.requires_grad_(), 4, 3, 2, 9, 11))
    grad = torch.randn(2, 3, 9, 11, generator=generator("opcheck-bil-g"))
    torch.library.opcheck(torch.ops.fcnkern.bilinear_upsample_crop_bwd.default, (grad, 4, 3, 2, 4, 5))
    torch._dynamo.reset()
    step = torch.compile(lambda t: bilinear_upsample_crop(t, 4, (3, 2), (9, 11), backend="cpu"), fullgraph=True,
                         backend="aot_eager")  # fmt: skip
    torch.testing.assert_close(step(x), bilinear_upsample_crop(x, 4, (3, 2), (9, 11), backend="torch"))


@pytest.mark.parametrize(("device", "backend"), _backend_params())
@pytest.mark.parametrize("channels", [3, 8], ids=lambda c: f"c{c}")  # CUDA-core and tensor-core Triton variants
def test_upsample_crop_gradcheck_float64(device, backend, channels):
    g = generator("gradcheck-up", channels)
    x = torch.randn(2, channels, 2, 3, generator=g, dtype=torch.float64).to(device).requires_grad_()
    w = torch.randn(channels, channels, 3, 2, generator=g, dtype=torch.float64).to(device).requires_grad_()
    b = torch.randn(channels, generator=g, dtype=torch.float64).to(device).requires_grad_()
    fn = lambda x, w, b: upsample_crop_fn(x, w, (2, 1), (1, 0), (4, 4), b, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b), fast_mode=interpreted(backend, device))


def test_learned_op_registration():
    """opcheck (schema, fake kernel, autograd registration) of the C++ and Triton learned ops, and a fullgraph
    torch.compile through each."""
    g = generator("opcheck-up")
    x = torch.randn(2, 4, 3, 5, generator=g, requires_grad=True)
    w = torch.randn(4, 2, 4, 4, generator=g, requires_grad=True)
    b = torch.randn(4, generator=g, requires_grad=True)
    args = (x, w, b, [2, 2], [1, 2], [6, 9], 2)
    grad = torch.randn(2, 4, 6, 9, generator=g)
    ops = []
    if fcnkern.backend_info("cpu").available:
        ops.append(("cpu", torch.ops.fcnkern.upsample_crop, torch.ops.fcnkern.upsample_crop_bwd))
    if fcnkern.backend_info("triton").available and fcnkern.backend.triton_interpreter():
        ops.append(("triton", torch.ops.fcnkern.triton_upsample_crop, torch.ops.fcnkern.triton_upsample_crop_bwd))
    if not ops:
        pytest.skip("neither the cpu nor the (interpreted) triton backend is available here")
    for backend, fwd, bwd in ops:
        torch.library.opcheck(fwd.default, args)
        torch.library.opcheck(bwd.default, (grad, x.detach(), w.detach(), [2, 2], [1, 2], 2, [True, True, True]))
        torch._dynamo.reset()

        def layer(a, ww, bb, be=backend):
            return upsample_crop_fn(a, ww, 2, (1, 2), (6, 9), bb, 2, backend=be)

        step = torch.compile(layer, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(step(x, w, b), _reference(x, w, 2, (1, 2), (6, 9), b, 2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("device", "backend"), _backend_params())
def test_output_keeps_channels_last(device, backend):
    x = torch.randn(2, 4, 5, 6, device=device).contiguous(memory_format=torch.channels_last)
    out = bilinear_upsample_crop(x, 2, (1, 1), (8, 9), backend=backend)
    assert out.is_contiguous(memory_format=torch.channels_last)
    weight = bilinear_weight(4, 4).to(device)
    assert upsample_crop_fn(x, weight, 2, (0, 0), (8, 9), backend=backend).is_contiguous(
        memory_format=torch.channels_last
    )
    assert upsample_crop_fn(x.contiguous(), weight, 2, (0, 0), (8, 9), backend=backend).is_contiguous()


def test_fcn32s_geometry_gives_an_input_sized_output():
    """score_fr for a 500 x 500 input, upsampled by 32 and cropped at the derived offset, is 500 x 500 again."""
    trunk = list(geometry.VGG16_FCN_TRUNK)
    score = geometry.output_size(trunk, 500)
    crop = geometry.fcn_crops("fcn32s")["upscore"]
    out = bilinear_upsample_crop(torch.randn(1, 21, score, score), 32, (crop, crop), (500, 500))
    assert out.shape == (1, 21, 500, 500)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@split_examples(2)
@given(
    data=st.data(),
    c_g=st.integers(1, 9),  # from 8 output channels per group the Triton path takes the cell GEMMs
    groups=st.integers(1, 3),
    factor=st.integers(1, 5),
    k=st.integers(1, 11),
    h=st.integers(1, 5),
    w=st.integers(1, 5),
)
def test_property_random_learned_geometries(data, c_g, groups, factor, k, h, w, backend):
    """Random factors, kernels (smaller and larger than the stride, odd and even), crops and windows anywhere in
    the full output, groups: forward and the three gradients against conv_transpose2d + slicing."""
    require_backend(backend)
    crop, size = draw_window(data, ((h - 1) * factor + k, (w - 1) * factor + k))
    _check_learned("cpu", backend, torch.float32, (c_g * groups, factor, k, groups, h, w, crop, size), "nchw")


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@split_examples(2)
@given(
    data=st.data(),
    c=st.integers(1, 4),
    factor=st.integers(1, 7),
    h=st.integers(1, 5),
    w=st.integers(1, 5),
)
def test_property_random_bilinear_geometries(data, c, factor, h, w, backend):
    require_backend(backend)
    crop, size = draw_window(data, ((h + 1) * factor, (w + 1) * factor))
    _check_bilinear("cpu", backend, torch.float32, (c, factor, h, w, crop, size), "nchw")


def test_bad_input_raises():
    x, w = torch.randn(1, 4, 3, 3), bilinear_weight(4, 4)
    with pytest.raises(ValueError, match="outside the upsampled output"):
        upsample_crop_fn(x, w, 2, (1, 0), (8, 8))  # full output is 8 x 8
    with pytest.raises(ValueError, match=">= 0"):
        upsample_crop_fn(x, w, 2, (-1, 0), (4, 4))
    with pytest.raises(ValueError, match="out_size must be >= 0"):
        bilinear_upsample_crop(x, 2, (0, 0), (-1, 4))
    with pytest.raises(ValueError, match="groups"):
        upsample_crop_fn(x, w, 2, (0, 0), (4, 4), groups=3)
    with pytest.raises(ValueError, match="weight is"):
        upsample_crop_fn(x, w.double(), 2, (0, 0), (4, 4))
    with pytest.raises(TypeError, match="float32"):
        bilinear_upsample_crop(x.long(), 2, (0, 0), (4, 4))
    for factor in (0, True, 2.0):  # True was taken as factor 1 by the kernel backends (the torch one raised)
        with pytest.raises(ValueError, match="factor"):
            bilinear_upsample_crop(x, factor, (0, 0), (4, 4))
    with pytest.raises(BackendUnavailableError, match="backend 'cuda'"):  # CPU tensors, or no CUDA build here
        upsample_crop_fn(x, w, 2, (0, 0), (4, 4), backend="cuda")
    with pytest.raises(ValueError, match="at least one pixel"):
        upsample_crop_fn(x[:, :, :0], w, 2, (0, 0), (1, 1))
    with pytest.raises(ValueError, match="bias"):
        upsample_crop_fn(x, w, 2, (0, 0), (4, 4), torch.randn(4, dtype=torch.float64))
    for backend in ("torch", "cpu"):  # PyTorch's ConvTranspose2d raises on no channels too (the torch backend did)
        with pytest.raises(ValueError, match="no channels"):
            bilinear_upsample_crop(x[:, :0], 2, (0, 0), (4, 4), backend=backend)
        with pytest.raises(ValueError, match="no channels"):
            upsample_crop_fn(x[:, :0], w[:0], 2, (0, 0), (4, 4), backend=backend)
        with pytest.raises(ValueError, match="no output channels"):
            upsample_crop_fn(x, w[:, :0], 2, (0, 0), (4, 4), backend=backend)


@pytest.mark.parametrize("learnable", [True, False])
def test_module_state_dict_matches_conv_transpose(learnable):
    c, f = 21, 8
    module = fcnkern.nn.UpsampleCrop(c, f, learnable=learnable)
    reference = nn.ConvTranspose2d(c, c, 2 * f, f, bias=False)
    assert {k: v.shape for k, v in module.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()
    }
    assert (module.weight.requires_grad, isinstance(module.weight, nn.Parameter)) == (learnable, learnable)
    reference.weight.data.copy_(bilinear_weight(c, 2 * f))
    module.load_state_dict(reference.state_dict())
    x = torch.randn(2, c, 5, 4, generator=generator("module", learnable))
    crop, size = (3, 5), (30, 25)
    expected = reference(x)[:, :, crop[0] : crop[0] + size[0], crop[1] : crop[1] + size[1]]
    torch.testing.assert_close(module(x, crop, size), expected, rtol=1e-5, atol=1e-5)


def test_fixed_module_refuses_a_learned_weight():
    module = fcnkern.nn.UpsampleCrop(3, 2, learnable=False)
    with pytest.raises(ValueError, match="not the bilinear kernel"):
        module.load_state_dict({"weight": torch.randn(3, 3, 4, 4)})
    learnable = fcnkern.nn.UpsampleCrop(3, 2, learnable=True)
    learnable.load_state_dict({"weight": torch.randn(3, 3, 4, 4)})
