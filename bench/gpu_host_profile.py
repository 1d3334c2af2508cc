"""Where the host time of fcnkern's GPU calls goes (issues 3 and 5): on the H200 (run 11) a Triton conv + ReLU
forward on a tiny layer (score_fr) took 0.36 ms per synchronised call against cuDNN's 0.06, and the FCN-8s bf16
training step spent 17.5 ms of host time against the eager twin's 11.9. Three parts, printed as they finish:

1. JSON lines ``host_us``: microseconds per call in a loop without synchronisation (the host's cost, as
   bench/call_overhead.py), median of 7 repeats of 100 calls, for each op and backend on tiny CUDA tensors, with an
   empty Triton kernel of 30 arguments (what a launch costs Triton itself) and PyTorch's own ops beside them.
2. cProfile of 200 calls of the Triton conv + ReLU forward + backward: the 25 functions with the most own time.
3. cProfile of 10 FCN-8s training steps (bf16, 1 x 3 x 500 x 500) of fcnkern's model and of the eager twin: the 30
   functions with the most own time each.

    python bench/gpu_host_profile.py            # on a CUDA machine
"""

from __future__ import annotations

import cProfile
import io
import json
import pstats
import statistics
import time

import call_overhead  # bench/, beside this script
import torch
import triton
import triton.language as tl
from gpu_probe import training_step  # bench/, beside this script

import fcnkern
from fcnkern import models


@triton.jit
def _empty_kernel(p0, p1, p2, p3, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, b0, b1, b2, b3, b4, b5, b6, b7, b8, b9,
                  c0, c1, c2, c3, FLAG: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    pass


def host_us(fn, calls: int = 100, repeats: int = 7) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    reps = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        reps.append((time.perf_counter() - start) / calls * 1e6)
        torch.cuda.synchronize()
    return round(statistics.median(reps), 1)


def op_cases() -> dict:
    """bench/call_overhead.py's cases per backend, and an empty Triton launch. (Run 14 ran an earlier copy of
    them here, with a 1 x 32 x 8 x 8 conv input where call_overhead has 1 x 3 x 8 x 8: host time, not work.)"""
    p = [torch.empty(16, device="cuda") for _ in range(4)]
    args = (*p, *range(10), *range(10), *range(4))
    result = {"empty triton kernel, 30 args": lambda: _empty_kernel[(1,)](*args, FLAG=True, BLOCK=64)}
    for be in ("triton", "cuda", "torch"):
        ops = call_overhead.cases("cuda", be)
        result |= {f"{name} [{be}]": fn for name, fn in ops.items() if "PyTorch" not in name or be == "triton"}
    return result


def profile_text(fn, calls: int, top: int) -> str:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def main() -> None:
    for name, fn in op_cases().items():
        try:
            print(json.dumps({"probe": "host_us", "case": name, "us_per_call": host_us(fn)}), flush=True)
        except Exception as exc:  # a backend missing here is a row saying so, not the end of the run
            print(json.dumps({"probe": "host_us", "case": name, "error": repr(exc)[:200]}), flush=True)

    c = torch.randn(1, 32, 8, 8, device="cuda", requires_grad=True)
    w = torch.randn(32, 32, 3, 3, device="cuda", requires_grad=True)
    b = torch.randn(32, device="cuda", requires_grad=True)
    conv = lambda: fcnkern.conv2d_relu(c, w, b, padding=1, backend="triton").sum().backward()  # noqa: E731
    print("== cProfile: 200 x Triton conv2d_relu fwd+bwd (1 x 32 x 8 x 8)\n" + profile_text(conv, 200, 25), flush=True)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 500, 500, generator=g).to("cuda", torch.bfloat16)
    target = torch.randint(0, 21, (1, 500, 500), generator=g).to("cuda")
    for name, twin in (("fcnkern", False), ("pytorch-eager", True)):
        torch.manual_seed(0)
        model = models.fcn8s(21, twin=twin).to("cuda", torch.bfloat16).train()
        _, step = training_step(model, x, target)
        row = {"probe": "host_us", "case": f"FCN-8s train step [{name}]", "us_per_call": host_us(step, 5, 3)}
        print(json.dumps(row), flush=True)
        print(f"== cProfile: 10 FCN-8s bf16 training steps, {name}\n" + profile_text(step, 10, 30), flush=True)


if __name__ == "__main__":
    main()
