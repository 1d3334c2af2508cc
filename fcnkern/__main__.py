"""Command line: ``python -m fcnkern`` (or ``fcnkern``).

- ``fcnkern info``: versions, how the C++/CUDA extension was obtained, and which backends can run here and why not.
- ``fcnkern bench``: each op's fcnkern backends against the PyTorch way on the devices present, time and peak memory,
  as a table (and JSON with ``--json FILE``).

With no sub-command it runs ``info`` and then ``bench``. Training and evaluating an FCN end to end arrive with the
model and main-job work (issues 5 and 6).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch

import fcnkern
from fcnkern import _ext
from fcnkern.benchmarking import cross_entropy_step, median_ms, peak_extra_bytes


def cmd_info(_args: argparse.Namespace) -> int:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    print(f"fcnkern {fcnkern.__version__} | torch {torch.__version__} | triton {triton_version} | "
          f"python {platform.python_version()} | CUDA devices: {torch.cuda.device_count()}")  # fmt: skip
    status = _ext.load()
    print(f"C++ extension: {status.origin if status.error is None else status.error}")
    print(f"{'backend':<8} {'available':<10} reason")
    for info in fcnkern.backends().values():
        print(f"{info.name:<8} {'yes' if info.available else 'no':<10} {info.reason}")
    return 0


def _bench_cases(args: argparse.Namespace):
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        backends = ["cpu"] if device == "cpu" else ["cuda", "triton"]
        for shape in args.shapes:
            for backend in backends:
                info = fcnkern.backend_info(backend)
                if info.available:
                    yield device, shape, backend
                else:
                    print(f"  skipped {backend} on {device}: {info.reason}", file=sys.stderr)


def cmd_bench(args: argparse.Namespace) -> int:
    rows = []
    print(f"{'op':<14} {'device':<6} {'shape':<14} {'mode':<8} {'impl':<8} {'ms':>9} {'vs torch':>9} {'peak MB':>9}")
    for device, shape, backend in _bench_cases(args):
        g = torch.Generator().manual_seed(0)
        n, c, h, w = shape
        logits = (torch.randn(shape, generator=g) * 3).to(device)
        target = torch.randint(0, c, (n, h, w), generator=g).to(device)
        for mode in ("fwd", "fwd+bwd"):
            timings = {}
            for impl in ("torch", backend):
                step = cross_entropy_step(impl, logits, target, mode)
                ms = median_ms(step, device, rounds=args.rounds)
                peak = (peak_extra_bytes(step, device) or 0) / 2**20
                timings[impl] = ms
                row = {"op": "cross_entropy", "device": device, "shape": list(shape), "mode": mode, "impl": impl,
                       "ms": ms, "speedup_vs_torch": timings["torch"] / ms, "peak_extra_MB": peak}  # fmt: skip
                rows.append(row)
                print(f"{'cross_entropy':<14} {device:<6} {'x'.join(map(str, shape)):<14} {mode:<8} {impl:<8} "
                      f"{ms:9.2f} {row['speedup_vs_torch']:8.2f}x {peak:9.1f}", flush=True)  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "fcnkern": fcnkern.__version__, "results": rows}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


def _shape(text: str) -> tuple[int, int, int, int]:
    parts = tuple(int(p) for p in text.lower().split("x"))
    if len(parts) != 4 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"shape must be NxCxHxW with positive sizes, got {text!r}")
    return parts  # type: ignore[return-value]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fcnkern", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("info", help="versions, extension origin and available backends")
    bench = sub.add_parser("bench", help="fcnkern ops vs PyTorch: time and peak memory")
    bench.add_argument("--shapes", type=_shape, nargs="+", default=[(1, 21, 500, 500), (8, 21, 512, 512)],
                       metavar="NxCxHxW", help="logits shapes (default: 1x21x500x500 8x21x512x512)")  # fmt: skip
    bench.add_argument("--rounds", type=int, default=5, help="timed calls per case; the median is reported")
    bench.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "info":
        return cmd_info(args)
    if args.command == "bench":
        return cmd_bench(args)
    cmd_info(args)
    print()
    return cmd_bench(build_parser().parse_args(["bench"]))


if __name__ == "__main__":
    sys.exit(main())
