"""Tile and split sweep of the Triton cell-GEMM learned upsampling kernels (kernels/upsample.py), FCN-32s's learned
final layer (8 x 21 x 16 x 16 -> 500 x 500, k 64, stride 32, crop 19), fp32 (TF32 as PyTorch allows) and bf16.

Run 9 (H200, ncu at 1.36 GHz) had the forward at 640 us (232 registers, 12 % occupancy, SM throughput 60 % with DRAM
at 5 %: issue-bound), the dgrad GEMM at 911 us on 74 programs (2312 cells x 84 taps, a 21504-long reduction, on 132
SMs) and the wgrad at 753 us. Since then the gathers and the store compute their offsets as a cell part plus a row
part (one add per element), and the dgrad splits its reduction over rows. This probe times each kernel alone per
configuration (triton do_bench, median ms) so that the defaults in ``cell_blocks`` and the split count are chosen
by measurement; each configuration's result is compared with the default's (``max_rel_diff``), and the default
itself is what the GPU parity tests check. One JSON line per (kernel, dtype, configuration).

Predictions: a 64-row tile gathers its 96 x 64 tap tile again for each of the 336 row blocks (1.5 gathered taps per
output element), so 128-row tiles should cut the forward's gather work by half; the split dgrad should go from 74 to
~1000 programs and from ~0.9 ms to ~0.25 ms.
"""

import json
from functools import partial

import torch
import triton.testing
from fcnkern.kernels import upsample as k

import fcnkern
from fcnkern import upsample as up

FWD = [(64, 64, 32, 4), (128, 64, 32, 4), (128, 64, 32, 8), (64, 128, 32, 4), (128, 128, 32, 8), (256, 64, 32, 8)]
DGRAD = [(64, 64, 32, 4), (64, 32, 32, 4), (128, 32, 32, 4), (64, 128, 32, 4), (128, 128, 32, 8)]
DGRAD_SPLITS = [1, 4, 16, None]  # None: the launcher's own choice
WGRAD = [(64, 64, 32, 4), (128, 64, 32, 8), (128, 128, 32, 8), (64, 128, 32, 4), (32, 128, 32, 4)]


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _fixed_splits(m: int, splits: int, block: int) -> tuple[int, int]:
    per_split = up._cdiv(up._cdiv(m, splits), block) * block
    return up._cdiv(m, per_split), per_split


def sweep(kernel: str, dtype: torch.dtype, configs, run, splits=(None,)) -> None:
    default_blocks = k.cell_blocks
    default_splits = up._wgrad_splits
    reference = None
    try:
        for blocks in configs:
            for split in splits:
                k.cell_blocks = lambda elem, b=blocks: dict.fromkeys(("fwd", "dgrad", "wgrad"), b)
                if split is not None:
                    up._wgrad_splits = lambda m, programs, bk, device, s=split: _fixed_splits(m, s, bk)
                else:
                    up._wgrad_splits = default_splits
                row = {"probe": "cells_sweep", "kernel": kernel, "dtype": str(dtype).removeprefix("torch."),
                       "blocks": list(blocks), "splits": split}  # fmt: skip
                try:
                    out = run()
                    torch.cuda.synchronize()
                    reference = out if reference is None else reference
                    row["max_rel_diff"] = rel_diff(out, reference)
                    row["ms"] = bench(run)
                except Exception as e:  # a configuration that does not compile or fit is a result too
                    row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                print(json.dumps(row), flush=True)
    finally:
        k.cell_blocks = default_blocks
        up._wgrad_splits = default_splits


def main() -> None:
    assert torch.cuda.is_available(), "needs a CUDA device"
    g = torch.Generator(device="cuda").manual_seed(0)
    geometry = dict(stride=[32, 32], crop=[19, 19], groups=1)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(8, 21, 16, 16, device="cuda", generator=g).to(dtype)
        w = (fcnkern.bilinear_kernel(64, torch.float32).cuda().expand(21, 21, 64, 64) / 21).contiguous()
        w = (w + 0.01 * torch.randn(w.shape, device="cuda", generator=g)).to(dtype)
        grad = torch.randn(8, 21, 500, 500, device="cuda", generator=g).to(dtype)
        sweep("fwd", dtype, FWD, partial(up._triton_upsample, x, w, None, [32, 32], [19, 19], [500, 500], 1))
        bwd = partial(up._triton_upsample_bwd_cells, grad, x, w, **geometry)
        sweep("dgrad", dtype, DGRAD, lambda bwd=bwd: bwd(need_x=True, need_w=False)[0], DGRAD_SPLITS)
        sweep("wgrad", dtype, WGRAD, lambda bwd=bwd: bwd(need_x=False, need_w=True)[1])


if __name__ == "__main__":
    main()
