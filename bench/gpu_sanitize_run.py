"""A small run of every CUDA C++ and Triton kernel, forward and backward, every dtype, for compute-sanitizer
(memcheck, racecheck): odd sizes so that tails and masks are exercised. Exits non-zero on a numerical mismatch too."""

import os
import sys

import torch
import torch.nn.functional as F

import fcnkern

# argv[1:] picks the backends (default both), so that gpu_suite.sh can run one sanitizer process per backend.
BACKENDS = tuple(sys.argv[1:]) or ("cuda", "triton")


# FCNKERN_SANITIZE_PARTS picks the ops, in order (default all), so that the Triton run, whose kernels compile under
# the sanitizer, can be split over processes that each finish within the suite's limit.
PARTS = tuple(os.environ.get("FCNKERN_SANITIZE_PARTS", "cross_entropy,conv_relu,upsample,head").split(","))


def main() -> int:
    assert torch.cuda.is_available(), "needs a CUDA device"
    assert set(BACKENDS) <= {"cuda", "triton"}, f"unknown backends {BACKENDS}"
    parts = {"cross_entropy": _cross_entropy, "conv_relu": _conv_relu, "upsample": _upsample, "head": _head}
    assert set(PARTS) <= set(parts), f"unknown parts {PARTS}"
    failures = 0
    g = torch.Generator(device="cuda").manual_seed(0)
    # Progress per op, so that a run cut off by its time limit still shows which kernels it covered.
    for name in PARTS:
        failures += parts[name](g)
        torch.cuda.synchronize()
        print(f"{name} done ({failures} mismatches so far)", flush=True)
    torch.cuda.synchronize()
    print(f"sanitize run done: {failures} mismatches")
    return 1 if failures else 0


def _cross_entropy(g: torch.Generator) -> int:
    failures = 0
    for backend in BACKENDS:
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
    return failures


def _conv_relu(g: torch.Generator) -> int:
    """The CUDA C++ and Triton conv + ReLU kernels (forward, dgrad, wgrad with split-K) on odd geometries, every
    dtype."""
    failures = 0
    # (n, c, h, w, cout, k, stride, padding, dilation, groups)
    cases = [(1, 3, 11, 13, 8, 3, 1, 100, 1, 1), (2, 17, 9, 7, 21, 3, 2, 1, 1, 1), (1, 6, 8, 8, 4, 3, 1, 2, 2, 2),
             (1, 40, 5, 3, 21, 1, 1, 0, 1, 1), (1, 32, 7, 7, 24, 7, 1, 0, 1, 1)]  # fmt: skip
    for backend, dtype in [(b, d) for b in BACKENDS for d in (torch.float32, torch.float16, torch.bfloat16)]:
        for n, c, h, w, cout, k, stride, padding, dilation, groups in cases:
            x = torch.randn(n, c, h, w, device="cuda", generator=g).to(dtype).requires_grad_()
            weight = (torch.randn(cout, c // groups, k, k, device="cuda", generator=g) * 0.2).to(dtype)
            weight.requires_grad_()
            bias = torch.randn(cout, device="cuda", generator=g).to(dtype).requires_grad_()
            y = fcnkern.conv2d_relu(x, weight, bias, stride, padding, dilation, groups, backend=backend)
            grads = torch.autograd.grad(y.float().square().sum(), (x, weight, bias))
            # The fp64 reference runs on the CPU: under racecheck, cuDNN's own sm90 dgrad kernel reports shared-memory
            # hazards (H100, 2026-11-26), which are not fcnkern's to judge.
            leaves = [t.detach().cpu().double().requires_grad_() for t in (x, weight, bias)]
            ref = F.relu(F.conv2d(*leaves, stride, padding, dilation, groups))
            ref_grads = torch.autograd.grad(ref.square().sum(), leaves)
            err = float(((y.cpu().double() - ref).norm() / ref.norm().clamp_min(1e-12)).detach())
            # A gradient may overflow fp16 where its exact value does (conv1_1's bias sums ~50k padded pixels).
            big = torch.finfo(dtype).max / 2
            finite = all((a.cpu().isfinite() | (r.abs() > big)).all() for a, r in zip(grads, ref_grads, strict=True))
            if err > 2e-2 or not finite:
                print(f"MISMATCH conv2d_relu {backend} {dtype} {(n, c, h, w, cout, k)} rel err {err:.3g}")
                failures += 1
    return failures


def _upsample(g: torch.Generator) -> int:
    """The CUDA C++ and Triton upsampling kernels, learned (tensor-core and CUDA-core variants) and bilinear, forward
    and backward, on FCN and odd geometries, every dtype."""
    failures = 0
    # (n, c, h, w, factor, kernel, groups, crop, out_size)
    cases = [(1, 21, 3, 2, 32, 64, 21, (19, 19), (37, 5)), (2, 21, 5, 7, 2, 4, 1, (0, 0), (12, 16)),
             (1, 6, 4, 4, 3, 5, 2, (1, 2), (11, 12)), (2, 1, 1, 1, 4, 8, 1, (3, 1), (4, 5)),
             (1, 8, 2, 2, 32, 64, 1, (19, 7), (37, 29)), (1, 9, 3, 4, 3, 5, 1, (1, 2), (8, 11))]  # fmt: skip
    for backend in BACKENDS:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for n, c, h, w, f, k, groups, crop, size in cases:
                x = torch.randn(n, c, h, w, device="cuda", generator=g).to(dtype).requires_grad_()
                # Scaled by 1 / k: with unit weights the fp16 dx of the stride-32 full-mixing case passes 65504 (run 8:
                # |dx| up to 1.7e5 in fp32), which the finiteness check flagged for both backends.
                weight = (torch.randn(c, c // groups, k, k, device="cuda", generator=g) / k).to(dtype).requires_grad_()
                bias = torch.randn(c, device="cuda", generator=g).to(dtype).requires_grad_()
                out = fcnkern.upsample_crop(x, weight, f, crop, size, bias, groups, backend=backend)
                grads = torch.autograd.grad(out.float().square().sum(), (x, weight, bias))
                # The reference on the CPU: run 9's racecheck ran past its limit in this loop, and cuDNN's kernels
                # are not fcnkern's to check. 8 channels: the smallest that takes the cell-GEMM path.
                leaves = [t.detach().cpu().double() for t in (x, weight, bias)]
                full = F.conv_transpose2d(*leaves, f, groups=groups)
                ref = full[:, :, crop[0] : crop[0] + size[0], crop[1] : crop[1] + size[1]]
                bil = fcnkern.bilinear_upsample_crop(x, f, crop, size, backend=backend) if k == 2 * f else None
                (bil_grad,) = torch.autograd.grad(bil.float().sum(), x) if bil is not None else (x,)
                err = float((out.detach().cpu().double() - ref).norm() / ref.norm().clamp_min(1e-12))
                finite = all(t.isfinite().all() for t in (*grads, bil_grad))
                if err > 2e-2 or not finite:
                    print(f"MISMATCH upsample {backend} {dtype} {(n, c, h, w, f, k)} rel err {err:.3g}")
                    failures += 1
    return failures


def _head(g: torch.Generator) -> int:
    """The fused head (upsample_cross_entropy), CUDA C++ and Triton: the forward with the precomputed gradient
    (sum), the recomputing backward (none), every dtype, FCN-32s/8s and odd geometries."""
    failures = 0
    # (n, c, h, w, factor, crop, out_size)
    cases = [(1, 21, 3, 3, 32, (19, 19), (97, 89)), (2, 21, 5, 6, 8, (31, 31), (13, 17)),
             (1, 150, 3, 2, 2, (1, 1), (5, 3)), (3, 1, 1, 1, 3, (0, 2), (4, 3))]  # fmt: skip
    for backend in BACKENDS:
        for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            for n, c, h, w, f, crop, size in cases:
                s = torch.randn(n, c, h, w, device="cuda", generator=g).to(dtype).requires_grad_()
                t = torch.randint(0, c, (n, *size), device="cuda", generator=g)
                t[..., 0] = 255
                for reduction in ("sum", "none"):
                    loss = fcnkern.upsample_cross_entropy(s, t, f, crop, reduction=reduction, backend=backend)
                    (grad,) = torch.autograd.grad(loss.sum(), s)
                    ref = fcnkern.upsample_cross_entropy(s.detach().double(), t, f, crop, reduction=reduction,
                                                         backend="torch")  # fmt: skip
                    if not torch.allclose(loss.double(), ref, rtol=2e-2, atol=2e-2) or not grad.isfinite().all():
                        print(f"MISMATCH head {backend} {dtype} {(n, c, h, w, f)} {reduction}", flush=True)
                        failures += 1
    return failures


if __name__ == "__main__":
    sys.exit(main())
