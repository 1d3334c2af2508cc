"""Upsampling with the crop folded in: meaning (ConvTranspose2d + slicing), the bilinear kernel's properties, the
module's state_dict compatibility with nn.ConvTranspose2d, and input validation. Kernel backends plug into the
same parametrisation as they land; until then they are skipped with that reason."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import LOW_PRECISION, device_backend_params, generator, rel_err
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
    (21, 32, 64, 21, 3, 2, (19, 19), (37, 5)),  # FCN-32s upscore, per-class
    (21, 2, 4, 1, 5, 7, (0, 0), (12, 16)),  # FCN-8s upscore2, full mixing
    (21, 2, 4, 21, 6, 6, (5, 5), (7, 7)),
    (21, 8, 16, 21, 4, 3, (31, 2), (3, 29)),  # upscore8 crop
    (1, 4, 8, 1, 5, 5, (3, 1), (13, 17)),
    (5, 16, 32, 5, 2, 3, (9, 0), (23, 47)),
    (6, 3, 5, 2, 4, 4, (1, 2), (11, 12)),  # odd kernel, groups 2
]


@pytest.mark.parametrize(("device", "backend"), _backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"c{c[0]}f{c[1]}k{c[2]}g{c[3]}crop{c[6][0]}")
def test_upsample_crop_matches_conv_transpose_and_slice(device, backend, dtype, case):
    c, f, k, groups, h, w, crop, size = case
    g = generator("upsample", case, dtype)
    x = torch.randn(2, c, h, w, generator=g).to(device, dtype)
    weight = torch.randn(c, c // groups, k, k, generator=g).to(device, dtype)
    bias = torch.randn(c, generator=g).to(device, dtype)
    upstream = torch.randn(2, c, *size, generator=g).to(device, dtype)

    def run(fn, *args):
        args = [a.detach().clone().requires_grad_() for a in args]
        out = fn(*args)
        grads = torch.autograd.grad(out, args, upstream.to(out.dtype))
        return out.detach(), grads

    ours, ours_g = run(
        lambda a, b, cc: upsample_crop_fn(a, b, f, crop, size, cc, groups, backend=backend), x, weight, bias
    )
    ref, ref_g = run(
        lambda a, b, cc: _reference(a, b, f, crop, size, cc, groups), x.double(), weight.double(), bias.double()
    )
    tol = 1e-5 if dtype == torch.float32 else (8e-3 if dtype == torch.float16 else 6e-2)
    assert ours.shape == (2, c, *size) and ours.dtype == dtype
    assert rel_err(ours, ref) <= tol
    for got, want in zip(ours_g, ref_g, strict=True):
        assert rel_err(got, want) <= tol


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
]


@pytest.mark.parametrize(("device", "backend"), _backend_params("bilinear_upsample_crop"))
@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "cropped_view"])
@pytest.mark.parametrize("case", BILINEAR_CASES, ids=lambda c: f"c{c[0]}f{c[1]}crop{c[4][0]}")
def test_bilinear_path_equals_diagonal_full_layer(device, backend, dtype, layout, case):
    """Forward and gradient equal nn.ConvTranspose2d(C, C, 2f, f) with FCN's diagonal bilinear weight, then the
    crop, computed in float64."""
    c, factor, h, w, crop, size = case
    k = 2 * factor
    g = generator("diag", case, dtype, layout)
    x = torch.randn(2, c, h, w, generator=g).to(device, dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "cropped_view":
        big = torch.randn(2, c, h + 3, w + 2, generator=g).to(device, dtype)
        big[:, :, 1 : 1 + h, 2 : 2 + w] = x
        x = big[:, :, 1 : 1 + h, 2 : 2 + w]
    layer = nn.ConvTranspose2d(c, c, k, factor, bias=False).to(device, torch.float64)
    layer.weight.data.copy_(bilinear_weight(c, k, torch.float64))
    xa, xb = x.detach().clone().requires_grad_(), x.detach().double().requires_grad_()
    ours = bilinear_upsample_crop(xa, factor, crop, size, backend=backend)
    ref = layer(xb)[:, :, crop[0] : crop[0] + size[0], crop[1] : crop[1] + size[1]]
    assert ours.shape == ref.shape and ours.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    assert rel_err(ours, ref) <= tol
    upstream = torch.randn(ours.shape, generator=g).to(device, dtype)
    ours.backward(upstream)
    ref.backward(upstream.double())
    assert rel_err(xa.grad, xb.grad) <= tol


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_bilinear_gradcheck_float64(backend):
    if not fcnkern.backend_info(backend).available:
        pytest.skip(f"backend {backend!r} unavailable: {fcnkern.backend_info(backend).reason}")
    x = torch.randn(2, 3, 3, 4, generator=generator("gc-bil"), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: bilinear_upsample_crop(x, 3, (2, 1), (7, 9), backend=backend), (x,))


def test_bilinear_cpu_op_registration():
    if not fcnkern.backend_info("cpu").available:
        pytest.skip(f"cpu backend unavailable: {fcnkern.backend_info('cpu').reason}")
    x = torch.randn(2, 3, 4, 5, generator=generator("opcheck-bil"))
    torch.library.opcheck(torch.ops.fcnkern.bilinear_upsample_crop.default, (x.requires_grad_(), 4, 3, 2, 9, 11))
    grad = torch.randn(2, 3, 9, 11, generator=generator("opcheck-bil-g"))
    torch.library.opcheck(torch.ops.fcnkern.bilinear_upsample_crop_bwd.default, (grad, 4, 3, 2, 4, 5))
    torch._dynamo.reset()
    step = torch.compile(lambda t: bilinear_upsample_crop(t, 4, (3, 2), (9, 11), backend="cpu"), fullgraph=True,
                         backend="aot_eager")  # fmt: skip
    torch.testing.assert_close(step(x), bilinear_upsample_crop(x, 4, (3, 2), (9, 11), backend="torch"))


def test_upsample_crop_gradcheck_float64():
    g = generator("gradcheck-up")
    x = torch.randn(1, 3, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 3, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: upsample_crop_fn(x, w, 2, (1, 2), (5, 6), b), (x, w, b))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_output_keeps_channels_last(backend):
    x = torch.randn(2, 4, 5, 6).contiguous(memory_format=torch.channels_last)
    out = bilinear_upsample_crop(x, 2, (1, 1), (8, 9), backend=backend)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert upsample_crop_fn(torch.randn(2, 4, 5, 6), bilinear_weight(4, 4), 2, (0, 0), (8, 9)).is_contiguous()


def test_fcn32s_geometry_gives_an_input_sized_output():
    """score_fr for a 500 x 500 input, upsampled by 32 and cropped at the derived offset, is 500 x 500 again."""
    trunk = list(geometry.VGG16_FCN_TRUNK)
    score = geometry.output_size(trunk, 500)
    crop = geometry.fcn_crops("fcn32s")["upscore"]
    out = bilinear_upsample_crop(torch.randn(1, 21, score, score), 32, (crop, crop), (500, 500))
    assert out.shape == (1, 21, 500, 500)


def test_bad_input_raises():
    x, w = torch.randn(1, 4, 3, 3), bilinear_weight(4, 4)
    with pytest.raises(ValueError, match="outside the upsampled output"):
        upsample_crop_fn(x, w, 2, (1, 0), (8, 8))  # full output is 8 x 8
    with pytest.raises(ValueError, match=">= 0"):
        upsample_crop_fn(x, w, 2, (-1, 0), (4, 4))
    with pytest.raises(ValueError, match="positive"):
        bilinear_upsample_crop(x, 2, (0, 0), (0, 4))
    with pytest.raises(ValueError, match="groups"):
        upsample_crop_fn(x, w, 2, (0, 0), (4, 4), groups=3)
    with pytest.raises(ValueError, match="weight is"):
        upsample_crop_fn(x, w.double(), 2, (0, 0), (4, 4))
    with pytest.raises(TypeError, match="float32"):
        bilinear_upsample_crop(x.long(), 2, (0, 0), (4, 4))
    with pytest.raises(ValueError, match="factor"):
        bilinear_upsample_crop(x, 0, (0, 0), (4, 4))
    with pytest.raises(BackendUnavailableError, match="no kernel for upsample_crop yet"):
        upsample_crop_fn(x, w, 2, (0, 0), (4, 4), backend="cpu")


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
