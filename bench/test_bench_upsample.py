"""Upsampling with the crop: fcnkern's backends vs the ways PyTorch users do it, measured in the same run.

FCN-32s's final layer: 21 classes, 16x16 scores to a 500x500 crop at offset 19 (kernel 64, stride 32), batch 1 and 8.

- Fixed bilinear (bilinear_upsample_crop). Baselines: pytorch-fcn's full ConvTranspose2d(21, 21, 64, 32) with the
  diagonal bilinear weight plus slicing; the depthwise ConvTranspose2d plus slicing; and F.interpolate(bilinear),
  which is cheaper but not the same values.
- Learned (upsample_crop, a full 21 x 21 x 64 x 64 weight, as pytorch-fcn trains it). Baseline:
  F.conv_transpose2d plus slicing, with gradients for x and the weight.

The Triton interpreter is never benchmarked; a backend that cannot run here is skipped with its reason.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fcnkern
from fcnkern.benchmarking import peak_extra_bytes, synchronized
from fcnkern.upsample import IMPLEMENTED

C, FACTOR, SCORE, CROP, OUT = 21, 32, 16, 19, 500
BASELINES = {"bilinear": ("pytorch-fcn-full", "depthwise", "interpolate"), "learned": ("conv_transpose2d",)}


def _params(path: str):
    op = "bilinear_upsample_crop" if path == "bilinear" else "upsample_crop"
    for device in ("cpu", "cuda"):
        ours = ["cpu"] if device == "cpu" else ["cuda", "triton"]
        for impl in [f"fcnkern-{b}" for b in ours] + list(BASELINES[path]):
            marks = []
            if device == "cuda" and not torch.cuda.is_available():
                marks.append(pytest.mark.skip(reason="no CUDA device"))
            elif impl.startswith("fcnkern-"):
                name = impl.removeprefix("fcnkern-")
                info = fcnkern.backend_info(name)
                if name not in IMPLEMENTED[op]:
                    marks.append(pytest.mark.skip(reason=f"no {name} kernel for {op} (issue 4)"))
                elif not info.available:
                    marks.append(pytest.mark.skip(reason=f"{name} backend unavailable: {info.reason}"))
            yield pytest.param(device, impl, marks=marks, id=f"{device}-{impl}")


def _window(t: torch.Tensor) -> torch.Tensor:
    return t[:, :, CROP : CROP + OUT, CROP : CROP + OUT].contiguous()


def _bilinear_fn(impl: str, device: str):
    k = 2 * FACTOR
    if impl.startswith("fcnkern-"):
        backend = impl.removeprefix("fcnkern-")
        return lambda t: fcnkern.bilinear_upsample_crop(t, FACTOR, (CROP, CROP), (OUT, OUT), backend=backend)
    if impl == "pytorch-fcn-full":
        weight = fcnkern.bilinear_weight(C, k).to(device)
        return lambda t: _window(F.conv_transpose2d(t, weight, stride=FACTOR))
    if impl == "depthwise":
        weight = fcnkern.bilinear_kernel(k).expand(C, 1, k, k).to(device)
        return lambda t: _window(F.conv_transpose2d(t, weight, stride=FACTOR, groups=C))
    return lambda t: F.interpolate(t, size=(OUT, OUT), mode="bilinear", align_corners=False)


def _learned_fn(impl: str):
    if impl.startswith("fcnkern-"):
        backend = impl.removeprefix("fcnkern-")
        return lambda t, w: fcnkern.upsample_crop(t, w, FACTOR, (CROP, CROP), (OUT, OUT), backend=backend)
    return lambda t, w: _window(F.conv_transpose2d(t, w, stride=FACTOR))


def _measure(benchmark, step, device: str, group: str) -> None:
    run = synchronized(step, device)
    run()  # warm-up: kernel compilation, allocator
    benchmark.group = group
    benchmark.extra_info["peak_extra_MB"] = (peak_extra_bytes(run, device) or 0) / 2**20
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize(("device", "impl"), list(_params("bilinear")))
def test_fcn32s_final_upsample(benchmark, batch, mode, device, impl):
    x = torch.randn(batch, C, SCORE, SCORE, generator=torch.Generator().manual_seed(0)).to(device)
    fn = _bilinear_fn(impl, device)
    if mode == "fwd":

        def step():
            with torch.no_grad():
                return fn(x)
    else:
        xg = x.clone().requires_grad_()
        upstream = torch.randn(batch, C, OUT, OUT, device=device)

        def step():
            fn(xg).backward(upstream)
            xg.grad = None

    _measure(benchmark, step, device, f"bilinear upsample+crop {device} N={batch} {mode}")


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize(("device", "impl"), list(_params("learned")))
def test_fcn32s_learned_upsample(benchmark, batch, mode, device, impl):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, C, SCORE, SCORE, generator=g).to(device)
    weight = fcnkern.bilinear_weight(C, 2 * FACTOR) + 0.01 * torch.randn(C, C, 2 * FACTOR, 2 * FACTOR, generator=g)
    weight = weight.to(device)
    fn = _learned_fn(impl)
    if mode == "fwd":

        def step():
            with torch.no_grad():
                return fn(x, weight)
    else:
        xg, wg = x.clone().requires_grad_(), weight.clone().requires_grad_()
        upstream = torch.randn(batch, C, OUT, OUT, device=device)

        def step():
            fn(xg, wg).backward(upstream)
            xg.grad = wg.grad = None

    _measure(benchmark, step, device, f"learned upsample+crop {device} N={batch} {mode}")
