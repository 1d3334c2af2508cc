"""A small run of every CUDA C++ and Triton kernel, forward and backward, every dtype, for compute-sanitizer
(memcheck, racecheck): odd sizes so that tails and masks are exercised. Exits non-zero on a numerical mismatch too."""

import sys

import torch
import torch.nn.functional as F

import fcnkern


def main() -> int:
    assert torch.cuda.is_available(), "needs a CUDA device"
    failures = 0
    g = torch.Generator(device="cuda").manual_seed(0)
    for backend in ("cuda", "triton"):
        for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            for shape in ((1, 1, 1, 1), (2, 21, 13, 17), (1, 150, 7, 5), (3, 5, 1, 257)):
                n, c, h, w = shape
                x = torch.randn(shape, device="cuda", generator=g).to(dtype).requires_grad_()
                t = torch.randint(0, c, (n, h, w), device="cuda", generator=g)
                t[..., 0] = 255
                for reduction in ("sum", "none"):
                    loss = fcnkern.pixelwise_cross_entropy(x, t, reduction=reduction, backend=backend)
                    (grad,) = torch.autograd.grad(loss.sum(), x)
                    ref = F.cross_entropy(x.detach().double(), t, ignore_index=255, reduction=reduction)
                    if not torch.allclose(loss.double(), ref, rtol=2e-2, atol=2e-2) or not grad.isfinite().all():
                        print(f"MISMATCH {backend} {dtype} {shape} {reduction}", flush=True)
                        failures += 1
    torch.cuda.synchronize()
    print(f"sanitize run done: {failures} mismatches")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
