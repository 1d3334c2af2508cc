"""Per-pass A/B of the CPU's Winograd kernels against its direct kernels (FCNKERN_CONV_WINOGRAD, read per call), in
one process, the two settings alternating: the data behind use_winograd's rule (cpp/conv_relu_winograd_cpu.cpp).

    python bench/winograd_passes.py 1x512x512x29 8x128x128x17 ...   # N x C x K x H (square maps, 3 x 3, padding 1)

Prints one JSON object: for each shape and pass (fwd, dx, dW + db through the op's backward, output_mask
selecting), the min over 4 alternating rounds of the direct ("0") and the Winograd ("all") time in ms. This VM's
timings move by up to 2x between processes, so the rule was read from the min of two processes.
"""

import json
import os
import sys
import time

import torch

import fcnkern

MODES = {"direct": "0", "winograd": "all"}


def min_ms(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def passes(n: int, c: int, k: int, h: int) -> dict:
    """The three passes of a 3 x 3, stride-1, padding-1 conv + ReLU of N x C x H x H into K channels."""
    op = torch.ops.fcnkern
    x = torch.randn(n, c, h, h)
    weight = torch.randn(k, c, 3, 3) / (c * 9) ** 0.5
    bias = torch.randn(k) * 0.1
    geometry = ([1, 1], [1, 1], [1, 1], 1, True)
    y = op.conv2d_relu(x, weight, bias, *geometry)
    dy = torch.randn_like(y)
    return {
        "fwd": lambda: op.conv2d_relu(x, weight, bias, *geometry),
        "dx": lambda: op.conv2d_relu_bwd(dy, y, x, weight, *geometry, [True, False, False]),
        "dw": lambda: op.conv2d_relu_bwd(dy, y, x, weight, *geometry, [False, True, True]),
    }


def main(shapes: list[str]) -> None:
    fcnkern._ext.load()
    torch.manual_seed(0)
    results = {}
    for shape in shapes:
        n, c, k, h = map(int, shape.split("x"))
        reps = max(3, int(0.7e9 / (n * h * h * c * k * 9)))
        for name, fn in passes(n, c, k, h).items():
            best = {}
            for _ in range(4):
                for mode, setting in MODES.items():
                    os.environ["FCNKERN_CONV_WINOGRAD"] = setting
                    fn()
                    best[mode] = min(best.get(mode, float("inf")), min_ms(fn, reps))
            os.environ.pop("FCNKERN_CONV_WINOGRAD")
            results[f"{shape} {name}"] = best
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1:])
