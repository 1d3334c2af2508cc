"""Second-order gradients (a first-order gradient built with create_graph=True, then differentiated) through every
op on every backend: gradgradcheck in float64, and equality with the pure-PyTorch path in float32. Before
fcnkern.second_order, the C++ backward ops were treated as constants (zero second-order gradients, a warning only)."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import device_backend_params, generator, interpreted

import fcnkern

BACKENDS = device_backend_params()


def _conv(device, dtype, relu=True, tiny=False):
    g = generator("second order conv", dtype, relu, tiny)
    n, c, h, w, k = (1, 2, 4, 3, 2) if tiny else (2, 3, 7, 6, 5)
    x, w, b = torch.randn(n, c, h, w, generator=g), torch.randn(k, c, 3, 3, generator=g), torch.randn(k, generator=g)
    return [t.to(device, dtype).requires_grad_() for t in (x, w, b)], (
        lambda x, w, b, backend: fcnkern.conv2d_relu(x, w, b, padding=1, relu=relu, backend=backend)
    )


def _upsample(device, dtype, tiny=False):
    g = generator("second order upsample", dtype, tiny)
    x = torch.randn(1, 2, 2, 3, generator=g) if tiny else torch.randn(2, 3, 4, 5, generator=g)
    w = torch.randn(x.shape[1], 2, 4, 4, generator=g)
    out = (3, 4) if tiny else (7, 8)
    return [t.to(device, dtype).requires_grad_() for t in (x, w)], (
        lambda x, w, backend: fcnkern.upsample_crop(x, w, 2, (1, 2), out, backend=backend)
    )


def _bilinear(device, dtype, tiny=False):
    x = torch.randn((1, 1, 2, 3) if tiny else (2, 3, 4, 5), generator=generator("second order bilinear", dtype))
    out = (5, 6) if tiny else (11, 13)
    return [x.to(device, dtype).requires_grad_()], (
        lambda x, backend: fcnkern.bilinear_upsample_crop(x, 4, (3, 2), out, backend=backend)
    )


def _cross_entropy(device, dtype, reduction="sum", tiny=False):
    g = generator("second order ce", dtype, reduction, tiny)
    logits, target = torch.randn(2, 5, 4, 3, generator=g), torch.randint(0, 5, (2, 4, 3), generator=g)
    target[0, 0, 0] = 255
    weight = torch.rand(5, generator=g).to(device) + 0.5

    def loss(x, backend):
        return fcnkern.pixelwise_cross_entropy(x, target.to(device), weight, reduction=reduction, backend=backend)

    return [logits.to(device, dtype).requires_grad_()], loss


def _head(device, dtype, reduction="sum", tiny=False):
    g = generator("second order head", dtype, reduction, tiny)
    n, h, w = (1, 5, 6) if tiny else (2, 11, 13)
    scores, target = torch.randn(n, 3, 4, 5, generator=g), torch.randint(0, 3, (n, h, w), generator=g)
    target[-1, 2, :4] = 255

    def loss(s, backend):
        return fcnkern.upsample_cross_entropy(s, target.to(device), 4, (3, 2), reduction=reduction, backend=backend)

    return [scores.to(device, dtype).requires_grad_()], loss


OPS = {
    "conv2d_relu": _conv,
    "conv2d": lambda device, dtype: _conv(device, dtype, relu=False),
    "upsample_crop": _upsample,
    "bilinear_upsample_crop": _bilinear,
    "pixelwise_cross_entropy": _cross_entropy,
    "pixelwise_cross_entropy-mean": lambda device, dtype: _cross_entropy(device, dtype, "mean"),
    "upsample_cross_entropy": _head,
    "upsample_cross_entropy-none": lambda device, dtype: _head(device, dtype, "none"),
}


def _second_order(inputs, fn, backend):
    """d/d(inputs) of ||d(sum(out^2))/d(inputs[0])||^2: the first-order gradient built with create_graph=True."""
    out = fn(*inputs, backend)
    (g,) = torch.autograd.grad(out.pow(2).sum(), inputs[0], create_graph=True)
    return torch.autograd.grad(g.pow(2).sum(), inputs)


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
@pytest.mark.parametrize("op", list(OPS))
def test_double_backward_matches_pytorch(device, backend, op):
    inputs, fn = OPS[op](device, torch.float32)
    with warnings.catch_warnings():
        # PyTorch's "autograd kernel was not registered" UserWarning meant zero gradients; not every warning (triton
        # 3.6's interpreter raises numpy DeprecationWarnings of its own)
        warnings.filterwarnings("error", category=UserWarning)
        ours = _second_order(inputs, fn, backend)
    reference = _second_order(inputs, fn, "torch")
    for a, r in zip(ours, reference, strict=True):
        assert r.abs().sum() > 0  # a second order that exists, so that zeros would fail
        torch.testing.assert_close(a, r, rtol=1e-3, atol=1e-5 * r.abs().max().item())  # fp32 sums, other order


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
@pytest.mark.parametrize("op", ["conv2d_relu", "upsample_crop", "bilinear_upsample_crop", "pixelwise_cross_entropy",
                                "upsample_cross_entropy"])  # fmt: skip
def test_gradgradcheck_float64(device, backend, op):
    """Tiny shapes: the numerical second derivative costs a backward per input element (fast mode in the Triton
    interpreter, see helpers.interpreted: 80 -> 4 s for the conv)."""
    inputs, fn = OPS[op](device, torch.float64, tiny=True)
    assert torch.autograd.gradgradcheck(lambda *t: fn(*t, backend), inputs, eps=1e-6, atol=1e-5, rtol=1e-4,
                                        fast_mode=interpreted(backend, device))  # fmt: skip


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
@pytest.mark.parametrize("op", ["conv2d", "upsample_crop"])
def test_create_graph_with_only_some_gradients_requested(device, backend, op):
    """x alone requiring grad: the backward op returns empty dweight/dbias, which must not alias each other (the
    Triton ops' did, and custom ops refuse aliased outputs when autograd records them), and the second order
    through the outputs that were asked for must still be right."""
    inputs, fn = OPS[op](device, torch.float32)
    inputs = [inputs[0], *(t.detach() for t in inputs[1:])]
    ours = _second_order(inputs[:1], lambda x, be: fn(x, *inputs[1:], be), backend)
    reference = _second_order(inputs[:1], lambda x, be: fn(x, *inputs[1:], be), "torch")
    assert reference[0].abs().sum() > 0
    torch.testing.assert_close(ours[0], reference[0], rtol=1e-3, atol=1e-5 * reference[0].abs().max().item())


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
@pytest.mark.parametrize("op", ["pixelwise_cross_entropy", "upsample_cross_entropy"])
def test_create_graph_mean_over_no_pixels(device, backend, op):
    """Every pixel ignored, reduction mean: the loss is NaN (0/0, as PyTorch's) and its upstream gradient infinite,
    yet the gradient is exactly 0, on the kernels' path and on the create_graph=True one (PyTorch's formula)."""
    inputs, _ = (_cross_entropy if op == "pixelwise_cross_entropy" else _head)(device, torch.float32)
    x = inputs[0]
    h, w = (x.shape[2], x.shape[3]) if op == "pixelwise_cross_entropy" else (11, 13)
    target = torch.full((x.shape[0], h, w), 255, device=device)
    if op == "pixelwise_cross_entropy":
        loss = fcnkern.pixelwise_cross_entropy(x, target, reduction="mean", backend=backend)
    else:
        loss = fcnkern.upsample_cross_entropy(x, target, 4, (3, 2), reduction="mean", backend=backend)
    for create_graph in (False, True):
        (g,) = torch.autograd.grad(loss, x, create_graph=create_graph, retain_graph=True)
        assert torch.equal(g, torch.zeros_like(g)), create_graph
