"""Empty inputs through every op on every backend, forward and backward: an empty batch, and an empty crop window
(out_size with a 0, or a target with no rows). PyTorch returns empty results and zero parameter gradients there (a
sum over nothing is 0, a mean over nothing is NaN), so fcnkern must too: no crash, no error, no poison left in a
gradient. The Triton conv's weight gradient divided by zero on an empty batch before this test."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import device_backend_params, generator

import fcnkern
from fcnkern.upsample import bilinear_weight

BACKENDS = device_backend_params()


def _conv_case(n, groups, relu):
    def build(g):
        return [torch.randn(n, 4, 6, 5, generator=g), torch.randn(6, 4 // groups, 3, 3, generator=g),
                torch.randn(6, generator=g)]  # fmt: skip

    def ours(x, w, b, backend):
        return fcnkern.conv2d_relu(x, w, b, padding=1, groups=groups, relu=relu, backend=backend)

    def ref(x, w, b):
        y = F.conv2d(x, w, b, padding=1, groups=groups)
        return F.relu(y) if relu else y

    return build, ours, ref


def _upsample_case(n, out_size):
    def build(g):
        return [torch.randn(n, 3, 4, 5, generator=g), torch.randn(3, 2, 4, 4, generator=g)]

    def ours(x, w, backend):
        return fcnkern.upsample_crop(x, w, 2, (1, 2), out_size, backend=backend)

    def ref(x, w):
        return F.conv_transpose2d(x, w, stride=2)[:, :, 1 : 1 + out_size[0], 2 : 2 + out_size[1]]

    return build, ours, ref


def _bilinear_case(n, out_size):
    def build(g):
        return [torch.randn(n, 3, 4, 5, generator=g)]

    def ours(x, backend):
        return fcnkern.bilinear_upsample_crop(x, 4, (3, 2), out_size, backend=backend)

    def ref(x):
        full = F.conv_transpose2d(x, bilinear_weight(3, 8, x.dtype).to(x.device), stride=4)
        return full[:, :, 3 : 3 + out_size[0], 2 : 2 + out_size[1]]

    return build, ours, ref


def _cross_entropy_case(shape, reduction):
    n, _, h, w = shape

    def build(g):
        return [torch.randn(shape, generator=g)]

    def target(device):
        return torch.zeros(n, h, w, dtype=torch.long, device=device)

    def ours(x, backend):
        return fcnkern.pixelwise_cross_entropy(x, target(x.device), reduction=reduction, backend=backend)

    def ref(x):
        return F.cross_entropy(x, target(x.device), ignore_index=255, reduction=reduction)

    return build, ours, ref


def _head_case(n, size, reduction):
    def build(g):
        return [torch.randn(n, 3, 4, 5, generator=g)]

    def target(device):
        return torch.zeros(n, *size, dtype=torch.long, device=device)

    def ours(x, backend):
        return fcnkern.upsample_cross_entropy(x, target(x.device), 4, (3, 2), reduction=reduction, backend=backend)

    def ref(x):
        full = F.conv_transpose2d(x, bilinear_weight(3, 8, x.dtype).to(x.device), stride=4)
        logits = full[:, :, 3 : 3 + size[0], 2 : 2 + size[1]]
        return F.cross_entropy(logits, target(x.device), ignore_index=255, reduction=reduction)

    return build, ours, ref


CASES = {
    "conv-batch0": _conv_case(0, 1, True),
    "conv-batch0-groups2-norelu": _conv_case(0, 2, False),
    "upsample-batch0": _upsample_case(0, (7, 8)),
    "upsample-rows0": _upsample_case(2, (0, 8)),
    "upsample-cols0": _upsample_case(2, (7, 0)),
    "bilinear-batch0": _bilinear_case(0, (11, 13)),
    "bilinear-window0": _bilinear_case(2, (0, 0)),
    **{f"ce-batch0-{r}": _cross_entropy_case((0, 5, 4, 3), r) for r in ("sum", "mean", "none")},
    **{f"ce-rows0-{r}": _cross_entropy_case((2, 5, 0, 3), r) for r in ("sum", "mean", "none")},
    **{f"head-batch0-{r}": _head_case(0, (11, 13), r) for r in ("sum", "mean", "none")},
    **{f"head-rows0-{r}": _head_case(2, (0, 13), r) for r in ("sum", "mean", "none")},
}


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_empty_forward_backward(device, backend, case):
    build, ours, ref = CASES[case]
    inputs = [t.to(device) for t in build(generator("empty", case))]
    mine = [t.clone().requires_grad_() for t in inputs]
    theirs = [t.clone().requires_grad_() for t in inputs]
    out, expected = ours(*mine, backend=backend), ref(*theirs)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    torch.testing.assert_close(out, expected, equal_nan=True, rtol=0, atol=0)
    # A mean over nothing is NaN, but no pixel passes its gradient on: every input gradient is still exactly 0.
    out.backward(torch.ones_like(out))
    expected.backward(torch.ones_like(expected))
    for i, (a, b) in enumerate(zip(mine, theirs, strict=True)):
        assert a.grad is not None and a.grad.shape == b.grad.shape, f"input {i}"
        torch.testing.assert_close(a.grad, b.grad, equal_nan=True, rtol=0, atol=0, msg=f"gradient of input {i}")
