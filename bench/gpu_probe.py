"""Why the Triton cross-entropy took 0.76 ms on 1 x 21 x 500 x 500 logits but 0.20 ms on 8 x 21 x 512 x 512 (H100,
bench/results/h100-*): the forward timed on batch 1 and 8 at sides 500 and 512, next to the CUDA C++ kernel and
F.cross_entropy. Prints one JSON line per case (median ms from triton.testing.do_bench)."""

import json

import torch
import torch.nn.functional as F
import triton.testing

import fcnkern


def main() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    for n, side in ((1, 500), (1, 512), (8, 500), (8, 512)):
        x = torch.randn(n, 21, side, side, device="cuda", generator=g)
        t = torch.randint(0, 21, (n, side, side), device="cuda", generator=g)
        row = {"shape": [n, 21, side, side]}
        with torch.no_grad():
            for backend in ("triton", "cuda"):
                row[backend] = triton.testing.do_bench(
                    lambda b=backend, x=x, t=t: fcnkern.pixelwise_cross_entropy(x, t, backend=b), return_mode="median"
                )
            row["torch"] = triton.testing.do_bench(
                lambda x=x, t=t: F.cross_entropy(x, t, ignore_index=255, reduction="sum"), return_mode="median"
            )
        row["GBps_triton"] = x.numel() * 4 / row["triton"] / 1e6
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
