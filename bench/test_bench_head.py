"""The fused FCN head (bilinear upsampling + crop + softmax cross-entropy, fcnkern.upsample_cross_entropy) against
the unfused fcnkern ops and against PyTorch, forward + backward (a training step's head), time and peak memory.

Heads: FCN-32s's (21 classes, factor 32, crop 19) and FCN-8s's (factor 8, crop 31), at batch 1 x 500 x 500 and
batch 8 x 512 x 512, with the low-resolution score sizes the networks produce there. Summed loss (the paper's).

- fcnkern-fused-<backend>: upsample_cross_entropy, no full-resolution logits or logit gradient.
- fcnkern-unfused-<backend>: bilinear_upsample_crop, then pixelwise_cross_entropy, on the same backend.
- pytorch-fcn-full: pytorch-fcn's way, ConvTranspose2d(21, 21, 2f, f) with the diagonal bilinear weight, slicing,
  F.cross_entropy.
- pytorch-depthwise: the same with a depthwise (groups = 21) ConvTranspose2d, the cheapest exact PyTorch way.

The Triton interpreter is never benchmarked; a backend that cannot run here is skipped with its reason.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fcnkern
from fcnkern.benchmarking import peak_extra_bytes, synchronized
from fcnkern.upsample_ce import IMPLEMENTED

C = 21
# name: (factor, crop, {(batch, size): low-resolution score size})
HEADS = {"fcn32s": (32, 19, {(1, 500): 16, (8, 512): 17}), "fcn8s": (8, 31, {(1, 500): 70, (8, 512): 74})}


def _params():
    for device in ("cpu", "cuda"):
        ours = ["cpu"] if device == "cpu" else ["cuda", "triton"]
        impls = [f"fcnkern-{way}-{b}" for way in ("fused", "unfused") for b in ours]
        for impl in [*impls, "pytorch-fcn-full", "pytorch-depthwise"]:
            marks = []
            if device == "cuda" and not torch.cuda.is_available():
                marks.append(pytest.mark.skip(reason="no CUDA device"))
            elif impl.startswith("fcnkern-"):
                name = impl.rsplit("-", 1)[1]
                info = fcnkern.backend_info(name)
                if name not in IMPLEMENTED:
                    marks.append(pytest.mark.skip(reason=f"no {name} kernel for upsample_cross_entropy (issue 8)"))
                elif not info.available:
                    marks.append(pytest.mark.skip(reason=f"{name} backend unavailable: {info.reason}"))
            yield pytest.param(device, impl, marks=marks, id=f"{device}-{impl}")


def _loss_fn(impl: str, factor: int, crop: int, target: torch.Tensor):
    size = tuple(target.shape[1:])
    if impl.startswith("fcnkern-fused-"):
        backend = impl.rsplit("-", 1)[1]
        return lambda s: fcnkern.upsample_cross_entropy(s, target, factor, (crop, crop), backend=backend)
    if impl.startswith("fcnkern-unfused-"):
        backend = impl.rsplit("-", 1)[1]

        def unfused(s):
            logits = fcnkern.bilinear_upsample_crop(s, factor, (crop, crop), size, backend=backend)
            return fcnkern.pixelwise_cross_entropy(logits, target, backend=backend)

        return unfused
    k = 2 * factor
    if impl == "pytorch-fcn-full":
        weight, groups = fcnkern.bilinear_weight(C, k).to(target.device), 1
    else:
        weight, groups = fcnkern.bilinear_kernel(k).expand(C, 1, k, k).to(target.device), C

    def pytorch(s):
        full = F.conv_transpose2d(s, weight, stride=factor, groups=groups)
        logits = full[:, :, crop : crop + size[0], crop : crop + size[1]]
        return F.cross_entropy(logits, target, ignore_index=255, reduction="sum")

    return pytorch


@pytest.mark.parametrize(("batch", "size"), [(1, 500), (8, 512)], ids=["1x500", "8x512"])
@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize(("device", "impl"), list(_params()))
def test_head_fwd_bwd(benchmark, device, impl, head, batch, size):
    factor, crop, score_sizes = HEADS[head]
    score = score_sizes[(batch, size)]
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(batch, C, score, score, generator=g).to(device).requires_grad_()
    target = torch.randint(0, C, (batch, size, size), generator=g)
    target[:, :, :8] = 255  # a void border, as PASCAL's labels have
    target = target.to(device)
    loss_fn = _loss_fn(impl, factor, crop, target)

    def step():
        scores.grad = None
        loss_fn(scores).backward()

    run = synchronized(step, device)
    run()  # warm-up: kernel compilation, allocator
    benchmark.group = f"{head} head fwd+bwd {device} {batch}x{C}x{size}x{size}"
    benchmark.extra_info["peak_extra_MB"] = (peak_extra_bytes(run, device) or 0) / 2**20
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
