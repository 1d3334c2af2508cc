"""Pixelwise softmax cross-entropy: fcnkern backends vs F.cross_entropy(..., ignore_index=255, reduction="sum").

Shapes are the FCN training case: 21 VOC classes at 500x500, batch 1, and 512x512, batch 8. The Triton
interpreter is never benchmarked (it exists for testing); a backend that cannot run here is skipped with its
reason, never replaced by another.
"""

from __future__ import annotations

import pytest
import torch

import fcnkern
from fcnkern.benchmarking import cross_entropy_step, peak_extra_bytes, synchronized

SHAPES = [(1, 21, 500, 500), (8, 21, 512, 512)]
DEVICES = ["cpu", "cuda"]
IMPLS = {"cpu": ["fcnkern-cpu", "torch"], "cuda": ["fcnkern-cuda", "fcnkern-triton", "torch"]}


def _params():
    for device in DEVICES:
        for impl in IMPLS[device]:
            marks = []
            if device == "cuda" and not torch.cuda.is_available():
                marks.append(pytest.mark.skip(reason="no CUDA device"))
            elif impl.startswith("fcnkern-"):
                info = fcnkern.backend_info(impl.removeprefix("fcnkern-"))
                if not info.available:
                    marks.append(pytest.mark.skip(reason=f"{info.name} backend unavailable: {info.reason}"))
            yield pytest.param(device, impl, marks=marks, id=f"{device}-{impl}")


def _inputs(shape, device, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    n, c, h, w = shape
    logits = (torch.randn(shape, generator=g) * 3).to(device=device, dtype=dtype)
    target = torch.randint(0, c, (n, h, w), generator=g)
    target[:, :8] = 255  # a void border, as in VOC labels
    return logits, target.to(device)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize(("device", "impl"), list(_params()))
def test_cross_entropy(benchmark, shape, mode, dtype, device, impl):
    logits, target = _inputs(shape, device, dtype)
    step = cross_entropy_step(impl.removeprefix("fcnkern-"), logits, target, mode)
    run = synchronized(step, device)
    run()  # warm-up: kernel compilation, allocator
    benchmark.group = f"cross_entropy {device} {str(dtype)[6:]} {'x'.join(map(str, shape))} {mode}"
    benchmark.extra_info["peak_extra_MB"] = (peak_extra_bytes(run, device) or 0) / 2**20
    benchmark.extra_info["logits_MB"] = logits.numel() * logits.element_size() / 2**20
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("design", ["gradient-in-forward", "recompute-in-backward"])
@pytest.mark.parametrize("device", DEVICES)
def test_design_kernels(benchmark, shape, design, device):
    """The design choice, measured on the C++/CUDA kernels for one training step at upstream gradient 1: one
    forward kernel that writes loss and gradient, plus (CUDA) the in-place scaling, which reads the upstream value
    on the device and does nothing for 1 (what both ship for eager training since session 12), against a forward
    kernel plus a backward kernel that recomputes softmax from the saved statistics (the CUDA path before)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if not fcnkern.backend_info(device).available:
        pytest.skip(f"{device} backend unavailable: {fcnkern.backend_info(device).reason}")
    logits, target = _inputs(shape, device)
    ops = torch.ops.fcnkern
    n, _, h, w = shape
    one = torch.ones((), device=device)
    upstream = one.expand(n, h, w)

    if design == "gradient-in-forward":

        def step():
            _, grad = ops.pixelwise_ce_fwd_grad(logits, target, None, 255)
            if device == "cuda":
                ops.pixelwise_ce_scale_grad_(grad, one.reshape(1))
            return grad
    else:

        def step():
            _, stats = ops.pixelwise_ce_fwd(logits, target, None, 255)
            return ops.pixelwise_ce_bwd(upstream, logits, target, None, stats, 255)

    run = synchronized(step, device)
    run()
    benchmark.group = f"design {device} {'x'.join(map(str, shape))}"
    benchmark.extra_info["peak_extra_MB"] = (peak_extra_bytes(run, device) or 0) / 2**20
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
