"""Random-geometry parity fuzz of every op against PyTorch, forward and backward; a tool, not a test (pytest does
not collect it). The tests pin chosen cases and derandomized Hypothesis examples; this draws fresh geometries,
dtypes and layouts from a seed, over wider ranges, and prints each case that fails.

    python tests/fuzz_parity.py --op conv --backend cpu --seed 1 --cases 300
    TRITON_INTERPRET=1 python tests/fuzz_parity.py --op upsample --backend triton --seed 2 --cases 40 --max-hw 8

Each result is judged against a float64 reference, no worse than twice PyTorch's own error in that dtype plus a
floor: the tests' rule (tests/helpers.py), but on the largest elementwise error relative to the reference's largest
value rather than on norms, and with an fp32 floor of 1e-6 rather than 1e-5, so stricter (fp16/bf16: four
roundings, as the tests; the Triton interpreter truncates fp32 -> bf16 where GPUs round to nearest). Non-finite
values where the reference is finite fail. Session 26 found with it a heap corruption in oneDNN's in-place matmul
(one-row products; the CPU conv's weight gradient of one output channel per group) and wrong Triton learned
upsampling for kernels no larger than the stride.
"""

from __future__ import annotations

import argparse
import math
import random

import torch
import torch.nn.functional as F
from helpers import LAYOUTS, UNIT_ROUNDOFF, memory_layout

import fcnkern

FLOOR = {
    torch.float32: 1e-6,
    torch.float16: 4 * UNIT_ROUNDOFF[torch.float16],
    torch.bfloat16: 4 * UNIT_ROUNDOFF[torch.bfloat16],
}


def _leaf(t: torch.Tensor | None, dtype: torch.dtype, kind: str = "contiguous", grad: bool = True):
    if t is None:
        return None
    return memory_layout(t.to(dtype), kind if t.dim() == 4 else "contiguous").detach().requires_grad_(grad)


def _results(fn, inputs: list[torch.Tensor | None], upstream: torch.Tensor) -> list[torch.Tensor]:
    out = fn(*inputs)
    out.backward(upstream.to(out.dtype))
    leaves = [t for t in inputs if t is not None and t.requires_grad]
    return [out.detach().double()] + [t.grad.double() for t in leaves]


def _judge(tag: str, dtype: torch.dtype, ours: list, theirs: list, ref: list) -> int:
    bad = 0
    for i, (o, t, r) in enumerate(zip(ours, theirs, ref, strict=True)):
        scale = r.abs().max().item() or 1.0
        e_ours, e_torch = (o - r).abs().max().item() / scale, (t - r).abs().max().item() / scale
        finite_where_ref = torch.isfinite(o) | ~torch.isfinite(r)
        if not finite_where_ref.all() or e_ours > 2 * e_torch + FLOOR[dtype]:
            print(f"BAD {tag} result {i}: rel. error {e_ours:.3g}, PyTorch's {e_torch:.3g}", flush=True)
            bad += 1
    return bad


def _compare(tag: str, dtype: torch.dtype, ours_fn, ref_fn, tensors: list, grads: list, kinds: list, upstream) -> int:
    def run(fn, dt):
        return _results(fn, [_leaf(t, dt, k, g) for t, g, k in zip(tensors, grads, kinds, strict=True)], upstream)

    return _judge(tag, dtype, run(ours_fn, dtype), run(ref_fn, dtype), run(ref_fn, torch.float64))


def conv_case(rng: random.Random, backend: str, max_hw: int, dtype: torch.dtype, kind: str) -> int:
    groups = rng.choice([1, 1, 1, 2, 3])
    c_g, k_g = rng.choice([1, 2, 3, 5, 8, 16, 17, 32, 64, 65]), rng.choice([1, 2, 3, 7, 8, 16, 33, 64, 70])
    r = rng.choice([1, 2, 3, 3, 3, 5, 7])
    s = rng.choice([r, r, r, 1, 3])
    stride, dilation = (rng.choice([1, 1, 2, 3]), rng.choice([1, 1, 2])), (rng.choice([1, 1, 2]), rng.choice([1, 3]))
    padding = (rng.choice([0, 1, 2, 3, 100 if c_g <= 3 else 1]), rng.choice([0, 1, 4]))
    n, h, w = rng.choice([1, 2, 3, 8]), rng.randint(1, max_hw), rng.randint(1, max_hw)
    if h + 2 * padding[0] <= dilation[0] * (r - 1) or w + 2 * padding[1] <= dilation[1] * (s - 1):
        return 0
    relu, geometry = rng.random() < 0.8, dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    x = torch.randn(n, c_g * groups, h, w, dtype=torch.float64)
    weight = torch.randn(k_g * groups, c_g, r, s, dtype=torch.float64) / math.sqrt(c_g * r * s)
    bias = torch.randn(k_g * groups, dtype=torch.float64) if rng.random() < 0.8 else None
    y_shape = F.conv2d(x, weight, None, **geometry).shape
    tag = f"conv x{tuple(x.shape)} w{tuple(weight.shape)} {geometry} relu={relu} bias={bias is not None} {dtype} {kind}"

    def ours(x, w, b):
        return fcnkern.conv2d_relu(x, w, b, relu=relu, backend=backend, **geometry)

    def ref(x, w, b):
        y = F.conv2d(x, w, b, **geometry)
        return F.relu(y) if relu else y

    return _compare(tag, dtype, ours, ref, [x, weight, bias], [True] * 3, [kind, "contiguous", "contiguous"],
                    torch.randn(y_shape, dtype=torch.float64))  # fmt: skip


def _window(rng: random.Random, full: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    top, left = rng.randint(0, full[0] - 1), rng.randint(0, full[1] - 1)
    return (top, left), (rng.randint(1, full[0] - top), rng.randint(1, full[1] - left))


def _scores_shape(rng: random.Random, max_hw: int) -> tuple[int, int, int, int]:
    return rng.choice([1, 2, 3]), rng.choice([1, 2, 3, 5, 21, 33, 150]), rng.randint(1, max_hw), rng.randint(1, max_hw)


def _cropped(t: torch.Tensor, crop: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    return t[..., crop[0] : crop[0] + size[0], crop[1] : crop[1] + size[1]]


def upsample_case(rng: random.Random, backend: str, max_hw: int, dtype: torch.dtype, kind: str) -> int:
    n, c, h, w = _scores_shape(rng, max_hw)
    f, learned = rng.choice([1, 2, 3, 4, 8, 16, 32]), rng.random() < 0.6
    k = rng.choice([2 * f, 2 * f, f, 2 * f + 1, 3]) if learned else 2 * f
    crop, size = _window(rng, ((h - 1) * f + k, (w - 1) * f + k))
    groups = rng.choice([1, c]) if learned else c
    x = torch.randn(n, c, h, w, dtype=torch.float64)
    if learned:
        weight = torch.randn(c, c // groups, k, k, dtype=torch.float64) / k
    else:
        weight = fcnkern.bilinear_kernel(k, torch.float64).expand(c, 1, k, k).contiguous()
    bias = torch.randn(c, dtype=torch.float64) if learned and rng.random() < 0.5 else None
    tag = f"upsample learned={learned} x{tuple(x.shape)} f{f} k{k} g{groups} crop{crop} out{size} {dtype} {kind}"

    def ours(x, wt, b):
        if learned:
            return fcnkern.upsample_crop(x, wt, f, crop, size, bias=b, groups=groups, backend=backend)
        return fcnkern.bilinear_upsample_crop(x, f, crop, size, backend=backend)

    def ref(x, wt, b):
        return _cropped(F.conv_transpose2d(x, wt, b, f, groups=groups), crop, size)

    return _compare(tag, dtype, ours, ref, [x, weight, bias], [True, learned, True], [kind, "contiguous", "contiguous"],
                    torch.randn(n, c, *size, dtype=torch.float64))  # fmt: skip


def loss_case(rng: random.Random, backend: str, max_hw: int, dtype: torch.dtype, kind: str) -> int:
    n, c, h, w = _scores_shape(rng, max_hw)
    ignore = rng.choice([255, -100] + ([0] if c > 1 else []))
    weight = torch.rand(c, dtype=torch.float64) + 0.5 if rng.random() < 0.4 else None
    reduction, f = rng.choice(["sum", "mean", "none"]), rng.choice([None, 2, 4, 8, 16, 32])
    if dtype == torch.float16 and reduction == "sum":
        reduction = "mean"  # an fp16 sum may pass 65504: inf, as F.cross_entropy's (documented in the docstrings)
    if f is None:
        shape = (h * rng.choice([1, 7]), w * rng.choice([1, 5]))
        x = torch.randn(n, c, *shape, dtype=torch.float64) * 3
    else:
        crop, shape = _window(rng, ((h + 1) * f, (w + 1) * f))
        x = torch.randn(n, c, h, w, dtype=torch.float64) * 3
    target = torch.randint(0, c, (n, *shape))
    target[torch.rand(target.shape) < 0.2] = ignore
    if reduction == "mean" and not (target != ignore).any():
        return 0  # NaN on both sides: tests/test_empty.py and the ignored-pixel tests cover it
    tag = f"loss factor={f} x{tuple(x.shape)} target{tuple(target.shape)} {reduction} ignore={ignore} {dtype} {kind}"

    def class_weight(like: torch.Tensor):
        return None if weight is None else weight.to(torch.float64 if like.dtype == torch.float64 else torch.float32)

    def ours(x):
        options = dict(weight=class_weight(x), ignore_index=ignore, reduction=reduction, backend=backend)
        if f is None:
            return fcnkern.pixelwise_cross_entropy(x, target, **options)
        return fcnkern.upsample_cross_entropy(x, target, f, crop, **options)

    def ref(x):
        if f is not None:
            kernel = fcnkern.bilinear_kernel(2 * f, x.dtype).expand(c, 1, 2 * f, 2 * f)
            x = _cropped(F.conv_transpose2d(x, kernel, None, f, groups=c), crop, shape)
        logits = x if x.dtype == torch.float64 else x.float()  # PyTorch's way in fp32: ours computes in fp32 too
        return F.cross_entropy(logits, target, weight=class_weight(x), ignore_index=ignore, reduction=reduction)

    upstream = torch.randn(n, *shape, dtype=torch.float64) if reduction == "none" else torch.tensor(1.7)
    return _compare(tag, dtype, ours, ref, [x], [True], [kind], upstream)


CASES = {"conv": conv_case, "upsample": upsample_case, "loss": loss_case}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--op", choices=sorted(CASES), required=True)
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", type=int, default=100)
    parser.add_argument("--max-hw", type=int, default=40, help="largest input height and width drawn")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rng, bad = random.Random(args.seed), 0
    for _ in range(args.cases):
        dtype = rng.choice([torch.float32, torch.float32, torch.bfloat16, torch.float16])
        kind = rng.choice(LAYOUTS)
        bad += CASES[args.op](rng, args.backend, args.max_hw, dtype, kind)
    print(f"{args.op} {args.backend} seed {args.seed}: {args.cases} cases, {bad} bad results")
    raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
