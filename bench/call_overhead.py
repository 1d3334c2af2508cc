"""Host time of one forward + backward call of each op on inputs so small that the kernels' own work is a few
microseconds: what a call costs in Python, autograd and dispatch, next to PyTorch's own ops in the same run.
Median over 15 repeats of the mean of 300 calls, in microseconds; one JSON line.

    python bench/call_overhead.py [cpu|cuda]

To compare two commits, run it from each checkout (PYTHONPATH=<checkout>) alternately, a few times each: the
machine's other load moves single runs by up to 2x.
"""

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import fcnkern


def cases(device: str, be: str | None = None) -> dict:
    """name -> forward + backward call of each op on tiny inputs on ``device``, through backend ``be`` (default: the
    C++ backend of that device), with PyTorch's own ops beside them."""
    be = be or ("cpu" if device == "cpu" else "cuda")
    kw = {"device": device}
    s = torch.randn(1, 21, 2, 2, **kw, requires_grad=True)
    t = torch.randint(0, 21, (1, 8, 8), **kw)
    x = torch.randn(1, 21, 8, 8, **kw, requires_grad=True)
    c = torch.randn(1, 3, 8, 8, **kw, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, **kw, requires_grad=True)
    b = torch.randn(4, **kw, requires_grad=True)
    uw = torch.randn(21, 21, 4, 4, **kw, requires_grad=True)
    return {
        "head (upsample_cross_entropy)": lambda: fcnkern.upsample_cross_entropy(s, t, 4, (2, 2), backend=be).backward(),
        "pixelwise_cross_entropy": lambda: fcnkern.pixelwise_cross_entropy(x, t, backend=be).backward(),
        "F.cross_entropy (PyTorch)": lambda: F.cross_entropy(x, t, ignore_index=255, reduction="sum").backward(),
        "conv2d_relu": lambda: fcnkern.conv2d_relu(c, w, b, padding=1, backend=be).sum().backward(),
        "F.relu(F.conv2d) (PyTorch)": lambda: F.relu(F.conv2d(c, w, b, padding=1)).sum().backward(),
        "bilinear_upsample_crop": lambda: (
            fcnkern.bilinear_upsample_crop(s, 4, (2, 2), (8, 8), backend=be).sum().backward()
        ),
        "upsample_crop (learned)": lambda: fcnkern.upsample_crop(s, uw, 2, (1, 1), (4, 4), backend=be).sum().backward(),
    }


def main() -> None:
    device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    result = {}
    for name, fn in cases(device).items():
        for _ in range(100):
            fn()
        reps = []
        for _ in range(15):
            sync()
            start = time.perf_counter()
            for _ in range(300):
                fn()
            sync()
            reps.append((time.perf_counter() - start) / 300 * 1e6)
        result[name] = round(statistics.median(reps), 1)
    root = Path(fcnkern.__file__).resolve().parents[1]
    rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    meta = {"device": device, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "fcnkern_checkout": str(root), "git": rev.stdout.strip()}  # fmt: skip
    print(json.dumps({"meta": meta, "us_per_call": result}))


if __name__ == "__main__":
    main()
