"""fcnkern's ops and models under ``torch.autocast``, against the PyTorch ops they replace under it (fcnkern/_amp.py):
the convolutions run in the autocast dtype (fp32 inputs cast, fp32 parameters getting fp32 gradients), the losses
return fp32. Values are judged as the low-precision parity tests judge them: against float64 on the same inputs,
no worse than twice PyTorch's own error under autocast plus a few roundings."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    LOW_PRECISION,
    assert_fp32_ok,
    assert_low_precision_ok,
    device_backend_params,
    fcn_and_twin,
    generator,
    rel_err,
)

import fcnkern
from fcnkern.upsample import bilinear_weight


def _conv(backend, x, w, b):
    if backend is None:
        return F.relu(F.conv2d(x, w, b, padding=1))
    return fcnkern.conv2d_relu(x, w, b, padding=1, backend=backend)


def _learned(backend, x, w, b):
    if backend is None:
        return F.conv_transpose2d(x, w, b, 2, groups=2)[:, :, 1:10, 2:12]
    return fcnkern.upsample_crop(x, w, 2, (1, 2), (9, 10), b, groups=2, backend=backend)


def _bilinear(backend, x):
    if backend is None:
        return _bilinear_diagonal(x, 2)[:, :, 1:9, 2:12]
    return fcnkern.bilinear_upsample_crop(x, 2, (1, 2), (8, 10), backend=backend)


TARGET = torch.randint(0, 5, (2, 6, 7), generator=generator("autocast-target"))
TARGET[0, 1, 1:4] = 255
CLASS_WEIGHT = torch.rand(5, generator=generator("autocast-weight")) + 0.5


def _class_weight(scores):
    """The fp32 class weight (float64 for the float64 truth, which runs without autocast)."""
    return CLASS_WEIGHT.to(scores.device, torch.float64 if scores.dtype == torch.float64 else torch.float32)


def _loss(backend, logits):
    target, weight = TARGET.to(logits.device), _class_weight(logits)
    if backend is None:
        return F.cross_entropy(logits, target, weight=weight, ignore_index=255, reduction="sum")
    return fcnkern.pixelwise_cross_entropy(logits, target, weight, backend=backend)


def _head(backend, scores):
    target, weight = TARGET.to(scores.device), _class_weight(scores)
    if backend is None:
        logits = _bilinear_diagonal(scores, 2)[:, :, 1:7, 2:9]
        return F.cross_entropy(logits, target, weight=weight, ignore_index=255, reduction="sum")
    return fcnkern.upsample_cross_entropy(scores, target, 2, (1, 2), weight, backend=backend)


def _bilinear_diagonal(x, f):
    """pytorch-fcn's way: the full ConvTranspose2d with FCN's diagonal bilinear weight."""
    return F.conv_transpose2d(x, bilinear_weight(x.shape[1], 2 * f, x.dtype).to(x.device), None, f)


# op name: (function of (backend or None for PyTorch's way, *inputs), input shapes, loss or convolution)
OPS = {
    "conv2d_relu": (_conv, [(2, 5, 9, 8), (7, 5, 3, 3), (7,)], False),
    "upsample_crop": (_learned, [(2, 6, 4, 5), (6, 3, 4, 4), (6,)], False),
    "bilinear_upsample_crop": (_bilinear, [(2, 3, 4, 5)], False),
    "pixelwise_cross_entropy": (_loss, [(2, 5, 6, 7)], True),
    "upsample_cross_entropy": (_head, [(2, 5, 4, 5)], True),
}


def _params() -> list:
    params = []
    for op in OPS:
        for pair in device_backend_params(op):
            device, backend = pair.values
            for dtype in LOW_PRECISION:
                params.append(pytest.param(op, device, backend, dtype, marks=pair.marks, id=f"{op}-{pair.id}-{dtype}"))
    return params


def _run(fn, backend, inputs, device_type, dtype, autocast=True):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    with torch.autocast(device_type, dtype=dtype, enabled=autocast):
        out = fn(backend, *leaves)
    upstream = torch.randn(out.shape, generator=generator("autocast-up", tuple(out.shape)), dtype=torch.float64)
    grads = torch.autograd.grad(out, leaves, upstream.to(out.device, out.dtype))
    return out.detach(), grads


@pytest.mark.parametrize(("op", "device", "backend", "dtype"), _params())
def test_matches_pytorch_under_autocast(op, device, backend, dtype):
    """fp32 inputs and parameters (and, for the losses, scores in the autocast dtype, as a convolution under
    autocast hands them on, with an fp32 class weight): the output dtype is PyTorch's, each gradient has its
    leaf's dtype, and the values are as close to float64 as PyTorch's are."""
    fn, shapes, is_loss = OPS[op]
    g = generator("autocast", op, dtype)
    inputs = [torch.randn(s, generator=g).to(device) for s in shapes]
    if is_loss:
        inputs[0] = inputs[0].to(dtype)
    ours, ours_g = _run(fn, backend, inputs, device, dtype)
    torch_way, torch_g = _run(fn, None, inputs, device, dtype)
    truth, truth_g = _run(fn, None, [t.double() for t in inputs], device, dtype, autocast=False)
    assert ours.dtype == torch_way.dtype == (torch.float32 if is_loss else dtype)
    for leaf, got, theirs in zip(inputs, ours_g, torch_g, strict=True):
        assert got.dtype == theirs.dtype == leaf.dtype
    for what, got, theirs, want in zip(("out", *range(len(inputs))), (ours, *ours_g), (torch_way, *torch_g),
                                       (truth, *truth_g), strict=True):  # fmt: skip
        if is_loss and what == "out":  # fp32 arithmetic on both sides
            assert_fp32_ok(got.double(), theirs.double(), want, f"{op} {what}")
        else:
            assert_low_precision_ok(got.double(), theirs.double(), want, dtype, f"{op} {what}")


@pytest.mark.parametrize(("device", "backend"), device_backend_params("conv2d_relu"))
def test_layer_after_an_autocast_conv(device, backend):
    """A fcnkern layer fed the bf16 output of an autocast nn.Conv2d: its fp32 weight no longer needs x's dtype
    (outside autocast, mixed dtypes stay an error)."""
    first = torch.nn.Conv2d(3, 4, 3, padding=1).to(device)
    layer = fcnkern.nn.Conv2dReLU(4, 6, 3, padding=1, backend=backend).to(device)
    x = torch.randn(2, 3, 7, 9, generator=generator("after-conv")).to(device)
    with torch.autocast(device, dtype=torch.bfloat16):
        y = layer(first(x))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32 and first.weight.grad.dtype == torch.float32
    with pytest.raises(ValueError, match=r"weight is torch\.float32"):
        layer(first(x).bfloat16())


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_fcn_under_autocast_matches_its_twin(backend):
    """FCN-8s's forward and model.loss under CPU autocast (bf16) next to its twin under autocast, both against the
    twin in float64: output and loss as close as the twin's; the gradients of the layers after the pools too (a
    pool's tied window, common in bf16, may send its gradient to either input)."""
    if not fcnkern.backend_info(backend).available:
        pytest.skip(f"backend {backend!r} unavailable: {fcnkern.backend_info(backend).reason}")
    model, twin = fcn_and_twin("fcn8s", backend, ("autocast-fcn",), num_classes=5)
    g = generator("autocast-fcn-input")
    x = torch.randn(2, 3, 37, 41, generator=g)
    target = torch.randint(0, 5, (2, 37, 41), generator=g)

    def run(net, inputs, autocast):
        net.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = net(inputs)
            loss = net.loss(inputs, target)
        loss.backward()
        grads = {k: p.grad for k, p in net.named_parameters() if not k.startswith("features.")}
        return out.detach(), loss.detach(), grads

    out, loss, grads = run(model, x, True)
    t_out, t_loss, t_grads = run(twin, x, True)
    r_out, r_loss, r_grads = run(twin.double(), x.double(), False)
    assert out.dtype == t_out.dtype == torch.bfloat16 and loss.dtype == t_loss.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in grads.values())
    bf16 = torch.bfloat16
    assert_low_precision_ok(out.double(), t_out.double(), r_out, bf16, "out")
    assert_low_precision_ok(loss.double(), t_loss.double(), r_loss, bf16, "loss")
    for name, grad in grads.items():
        assert_low_precision_ok(grad.double(), t_grads[name].double(), r_grads[name], bf16, name)
    assert rel_err(loss, r_loss) < 0.05  # and close in absolute terms: a bf16 network's loss
