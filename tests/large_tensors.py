"""Each op's kernels on tensors past 2**31 elements, where a 32-bit offset would wrap; a tool, not a test (pytest
does not collect it: it needs up to 18 GB of memory, and a few minutes on 2 CPU cores).

    FCNKERN_NO_CUDA=1 python tests/large_tensors.py ce conv upsample        # the cpu backend
    python tests/large_tensors.py --device cuda --backend triton            # or --backend cuda; all checks

Inputs are drawn on the CPU (the same values on every device) and moved to the device; references run there.

bf16 throughout, to halve the memory; every reference is fp32 or wider, so errors of one bf16 rounding are expected.
- ce: pixelwise cross-entropy of 1 x 21 x 10113^2 logits (2,147,728,149 elements), sum, forward and backward,
  against F.cross_entropy over row bands (fp32); the gradient compared on the first, middle and last rows.
- conv: 3x3 conv + ReLU of a 1 x 1 x 46341^2 map (2,147,488,281 elements), forward and dx, against F.conv2d on
  row bands (fp32), on the last rows (and dx on the first).
- upsample: FCN-32s's final bilinear upsampling + crop to 21 x 10113^2, forward against bands of the same op (each
  below 2**31 elements) and fp32 windows of the torch backend; its backward against the fp32 sum of the bands'
  gradients; the learned path's forward against its bands.
Prints each comparison and exits 1 if any error passes its bound.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

import fcnkern

BF16_ROUNDING = 2.0**-8  # relative: a bf16 result rounded once, plus headroom for fp32 summation order
FAILURES: list[str] = []
DEVICE, BACKEND = "cpu", "cpu"  # set by main()


def _seconds_since(start: float) -> float:
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _check(label: str, err: float, scale: float, nan: bool = False) -> None:
    bound = BF16_ROUNDING * max(scale, 1.0)
    ok = err <= bound and not nan
    print(f"{label}: max error {err:.4g} (bound {bound:.3g}){' NaN' if nan else ''} {'ok' if ok else 'FAIL'}")
    if not ok:
        FAILURES.append(label)


def _randn_bf16(shape: tuple[int, ...], g: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """Filled one plane row-band at a time: a full fp32 randn of this size would need 8.6 GB more."""
    out = torch.empty(shape, dtype=torch.bfloat16, device=DEVICE)
    flat = out.view(-1, shape[-1])
    for r in range(0, flat.shape[0], 4096):
        rows = flat[r : r + 4096]
        rows.copy_(torch.randn(rows.shape, generator=g) * scale)
    return out


def check_cross_entropy() -> None:
    c, h = 21, 10113
    g = torch.Generator().manual_seed(0)
    x = _randn_bf16((1, c, h, h), g, scale=3.0)
    t = torch.randint(0, c, (1, h, h), generator=g)
    t[0, -7:] = torch.where(torch.rand(7, h, generator=g) < 0.2, 255, t[0, -7:])  # ignored pixels at the end
    t = t.to(DEVICE)
    x.requires_grad_()
    start = time.perf_counter()
    loss = fcnkern.pixelwise_cross_entropy(x, t, backend=BACKEND)
    loss.backward()
    print(f"ce: {x.numel():,} logits, forward + backward {_seconds_since(start):.1f} s")
    ref = sum(
        float(
            F.cross_entropy(
                x.detach()[:, :, r : r + 256].float(), t[:, r : r + 256], ignore_index=255, reduction="sum"
            ).double()
        )
        for r in range(0, h, 256)
    )
    _check("ce loss (returned in bf16, as F.cross_entropy)", abs(float(loss.detach()) - ref), abs(ref))
    for r in (0, h // 2, h - 7):  # the last rows: offsets past 2**31 from the class-3 plane on
        xs = x.detach()[:, :, r : r + 7].float().requires_grad_()
        F.cross_entropy(xs, t[:, r : r + 7], ignore_index=255, reduction="sum").backward()
        got = x.grad[:, :, r : r + 7].float()
        _check(f"ce grad rows {r}-{r + 6}", float((got - xs.grad).abs().max()), 1.0, bool(got.isnan().any()))


def _conv_band(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, first: int, rows: int):
    """F.relu(F.conv2d(x, w, b, padding=1)) in fp32 on output rows [first, first + rows), from x's rows around them
    (only those are converted: all of x in fp32 would be 8.6 GB). Returns (output rows, those x rows as an fp32
    leaf that requires grad, the index of its first row in x)."""
    h = x.shape[-2]
    lo, hi = max(first - 1, 0), min(first + rows + 1, h)
    pad = (1, 1, 1 if first == 0 else 0, 1 if first + rows == h else 0)
    band = x[:, :, lo:hi].float().requires_grad_()
    return F.relu(F.conv2d(F.pad(band, pad), w.float(), b.float())), band, lo


def check_conv() -> None:
    h = 46341
    g = torch.Generator().manual_seed(1)
    x = _randn_bf16((1, 1, h, h), g)
    w = torch.randn(1, 1, 3, 3, generator=g).to(DEVICE, torch.bfloat16)
    b = torch.randn(1, generator=g).to(DEVICE, torch.bfloat16)
    x.requires_grad_()
    start = time.perf_counter()
    y = fcnkern.conv2d_relu(x, w, b, padding=1, backend=BACKEND)
    print(f"conv: {x.numel():,} input elements, forward {_seconds_since(start):.1f} s")
    ref = _conv_band(x.detach(), w, b, h - 64, 64)[0].detach()
    _check("conv y last rows", float((y.detach()[:, :, -64:].float() - ref).abs().max()), float(ref.abs().max()))
    gy = _randn_bf16(tuple(y.shape), g)
    start = time.perf_counter()
    y.backward(gy)
    print(f"conv: backward {_seconds_since(start):.1f} s")
    del y
    for first in (0, h - 64):
        out, xs, lo = _conv_band(x.detach(), w, b, first, 64)
        out.backward(gy[:, :, first : first + 64].float())
        # x rows all of whose outputs lie in the band: the band's own gradient is complete there
        keep = slice(0, 63) if first == 0 else slice(2, None)
        got = x.grad[:, :, lo : lo + xs.shape[-2]].float()[:, :, keep]
        want = xs.grad[:, :, keep]
        _check(f"conv dx rows near {first}", float((got - want).abs().max()), float(want.abs().max()),
               bool(got.isnan().any()))  # fmt: skip


def _torch_window(x: torch.Tensor, f: int, top_left: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """The torch backend's bilinear upsampling of x in fp32, cropped at top_left to size, from only the input block
    whose taps reach that window (the torch backend computes the whole uncropped output: 8.8 GB for all of x)."""
    i0, j0 = (max(0, t // f - 2) for t in top_left)  # taps of inputs before i0 end before the window starts
    block = x[:, :, i0 : i0 + size[0] // f + 5, j0 : j0 + size[1] // f + 5].float()
    crop = (top_left[0] - f * i0, top_left[1] - f * j0)
    return fcnkern.bilinear_upsample_crop(block, f, crop, size, backend="torch")


def check_upsample() -> None:
    c, h, f, crop = 21, 10113, 32, (19, 19)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, c, 318, 318, generator=g).to(DEVICE, torch.bfloat16)
    start = time.perf_counter()
    y = fcnkern.bilinear_upsample_crop(x, f, crop, (h, h), backend=BACKEND)
    print(f"upsample: {y.numel():,} output elements, bilinear forward {_seconds_since(start):.1f} s")
    for first in (0, h // 2, h - 300):
        band = fcnkern.bilinear_upsample_crop(x, f, (crop[0] + first, crop[1]), (300, h), backend=BACKEND)
        _check(f"bilinear y rows {first}+ vs its band", float((y[:, :, first : first + 300] != band).sum()), 0.0)
        window = _torch_window(x, f, (crop[0] + first, crop[1] + h - 50), (300, 50))
        err = float((y[:, :, first : first + 300, -50:].float() - window.float()).abs().max())
        _check(f"bilinear y rows {first}+ vs torch backend", err, float(window.float().abs().max()))
    del y
    gy = _randn_bf16((1, c, h, h), g)
    xg = x.clone().requires_grad_()
    start = time.perf_counter()
    fcnkern.bilinear_upsample_crop(xg, f, crop, (h, h), backend=BACKEND).backward(gy)
    print(f"upsample: bilinear backward {_seconds_since(start):.1f} s")
    ref = torch.zeros(x.shape, device=DEVICE)
    for first in range(0, h, 1024):
        rows = min(1024, h - first)
        xb = x.float().requires_grad_()
        band = fcnkern.bilinear_upsample_crop(xb, f, (crop[0] + first, crop[1]), (rows, h), backend=BACKEND)
        band.backward(gy[:, :, first : first + rows].float())
        ref += xb.grad
    _check("bilinear dx vs the sum of its bands (fp32)", float((xg.grad.float() - ref).abs().max()),
           float(ref.abs().max()), bool(xg.grad.isnan().any()))  # fmt: skip
    del gy
    w = fcnkern.bilinear_weight(c, 2 * f) + 0.01 * torch.randn(c, c, 2 * f, 2 * f, generator=g)
    w = w.to(DEVICE, torch.bfloat16)
    start = time.perf_counter()
    y = fcnkern.upsample_crop(x, w, f, crop, (h, h), backend=BACKEND)
    print(f"upsample: learned forward {_seconds_since(start):.1f} s")
    for first in (0, h - 300):
        band = fcnkern.upsample_crop(x, w, f, (crop[0] + first, crop[1]), (300, h), backend=BACKEND)
        _check(f"learned y rows {first}+ vs its band", float((y[:, :, first : first + 300] != band).sum()), 0.0,
               bool(band.isnan().any()))  # fmt: skip


CHECKS = {"ce": check_cross_entropy, "conv": check_conv, "upsample": check_upsample}


def main(argv: list[str]) -> int:
    global DEVICE, BACKEND
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checks", nargs="*", help=f"any of {', '.join(CHECKS)} (default: all)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="cpu", choices=("cpu", "cuda", "triton"))
    args = parser.parse_args(argv)
    unknown = set(args.checks) - set(CHECKS)
    if unknown:
        parser.error(f"unknown checks {sorted(unknown)}; choose from {', '.join(CHECKS)}")
    DEVICE, BACKEND = args.device, args.backend
    info = fcnkern.backend_info(BACKEND)
    if not info.available:
        print(f"backend {BACKEND} is unavailable: {info.reason}", file=sys.stderr)
        return 2
    for name in args.checks or list(CHECKS):
        CHECKS[name]()
    print(f"{BACKEND} on {DEVICE}: {len(FAILURES)} failures" + (f": {FAILURES}" if FAILURES else ""))
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
