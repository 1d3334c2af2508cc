"""Fixed bilinear upsampling with the crop: fcnkern vs the ways PyTorch users do it, measured in the same run.

FCN-32s's final layer: 21 classes, 16x16 scores to a 500x500 crop at offset 19 (kernel 64, stride 32), batch 1 and 8.
Baselines: pytorch-fcn's full ConvTranspose2d(21, 21, 64, 32) with the diagonal bilinear weight plus slicing; the
depthwise ConvTranspose2d plus slicing; and F.interpolate(bilinear), which is cheaper but not the same values.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fcnkern
from fcnkern.benchmarking import peak_extra_bytes
from fcnkern.upsample import IMPLEMENTED

C, FACTOR, SCORE, CROP, OUT = 21, 32, 16, 19, 500


def _impls():
    yield pytest.param("fcnkern-cpu", id="fcnkern-cpu")
    yield pytest.param("pytorch-fcn-full", id="pytorch-fcn-full")
    yield pytest.param("depthwise", id="depthwise")
    yield pytest.param("interpolate", id="interpolate")


def _fn(impl: str, x: torch.Tensor):
    k = 2 * FACTOR
    window = (slice(None), slice(None), slice(CROP, CROP + OUT), slice(CROP, CROP + OUT))
    if impl == "fcnkern-cpu":
        assert "cpu" in IMPLEMENTED["bilinear_upsample_crop"]
        return lambda t: fcnkern.bilinear_upsample_crop(t, FACTOR, (CROP, CROP), (OUT, OUT), backend="cpu")
    if impl == "pytorch-fcn-full":
        weight = fcnkern.bilinear_weight(C, k)
        return lambda t: F.conv_transpose2d(t, weight, stride=FACTOR)[window].contiguous()
    if impl == "depthwise":
        weight = fcnkern.bilinear_kernel(k).expand(C, 1, k, k)
        return lambda t: F.conv_transpose2d(t, weight, stride=FACTOR, groups=C)[window].contiguous()
    return lambda t: F.interpolate(t, size=(OUT, OUT), mode="bilinear", align_corners=False)


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", _impls())
def test_fcn32s_final_upsample(benchmark, batch, mode, impl):
    if impl == "fcnkern-cpu" and not fcnkern.backend_info("cpu").available:
        pytest.skip(f"cpu backend unavailable: {fcnkern.backend_info('cpu').reason}")
    x = torch.randn(batch, C, SCORE, SCORE, generator=torch.Generator().manual_seed(0))
    fn = _fn(impl, x)
    if mode == "fwd":

        def step():
            with torch.no_grad():
                return fn(x)
    else:
        xg = x.clone().requires_grad_()
        upstream = torch.randn(batch, C, OUT, OUT)

        def step():
            fn(xg).backward(upstream)
            xg.grad = None

    step()
    benchmark.group = f"bilinear upsample+crop cpu N={batch} {mode}"
    benchmark.extra_info["peak_extra_MB"] = (peak_extra_bytes(step, "cpu") or 0) / 2**20
    benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)
