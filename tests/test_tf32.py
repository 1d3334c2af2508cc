"""fp32 on the GPU follows PyTorch's TF32 switch for convolutions (``torch.backends.cudnn.allow_tf32``, on by
default): the Triton conv and learned-upsampling kernels use TF32 tensor cores where it is on and exact fp32 where it
is off. Every other test runs with it off (conftest); here each setting is judged at its own precision."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import FP32_TOL, generator, rel_err, require_backend

import fcnkern

# TF32 keeps 10 mantissa bits: each operand is rounded by up to 2^-11, and an fp32-accumulated dot product of them
# lands within a few such roundings of the exact value.
TF32_TOL = 4 * 2.0**-11


def _conv(backend: str):
    g = generator("tf32", "conv")
    x = torch.randn(2, 64, 17, 19, generator=g)
    w = torch.randn(48, 64, 3, 3, generator=g) / 24
    b = torch.randn(48, generator=g)
    ref = F.relu(F.conv2d(x.double(), w.double(), b.double(), padding=1))
    return lambda: fcnkern.conv2d_relu(*(t.cuda() for t in (x, w, b)), padding=1, backend=backend), ref


def _upsample(backend: str):
    g = generator("tf32", "upsample")
    x = torch.randn(2, 21, 9, 11, generator=g)
    w = torch.randn(21, 21, 4, 4, generator=g) / 9
    ref = F.conv_transpose2d(x.double(), w.double(), stride=2)[:, :, 1:18, 1:21]
    return lambda: fcnkern.upsample_crop(x.cuda(), w.cuda(), 2, (1, 1), (17, 20), backend=backend), ref


@pytest.mark.parametrize("op", [_conv, _upsample], ids=["conv2d_relu", "upsample_crop"])
def test_fp32_follows_pytorchs_tf32_switch(op, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: TF32 exists on GPUs only")
    require_backend("triton")
    run, ref = op("triton")
    errors = {}
    for allow in (False, True):
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", allow)
        errors[allow] = rel_err(run().cpu(), ref)
    assert errors[False] <= FP32_TOL, f"exact fp32: rel. error {errors[False]:.3g}"
    assert errors[True] <= TF32_TOL, f"TF32: rel. error {errors[True]:.3g}"
    # TF32 was really used: its rounding shows, far above fp32's.
    assert errors[True] > 10 * errors[False], errors
