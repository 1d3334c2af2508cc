"""Registers and stack bytes of the int32-index ReLU conv dgrad / wgrad configs (session 23's before / after table).

    python session23_bwd_compile.py [ARCH,...] [KERNEL,...] > records.jsonl

ARCH defaults to 80,90; KERNEL (exact names from fcnkern.kernels.conv_relu.launch_configs) to all of them. Runs with
whatever triton is importable (PYTHONPATH=<pip install --target dir> for another version)."""

import json
import sys

import triton
from fcnkern.kernels import compile_check, conv_relu

archs = [int(a) for a in (sys.argv[1] if len(sys.argv) > 1 else "80,90").split(",")]
names = set(sys.argv[2].split(",")) if len(sys.argv) > 2 else None
configs = [
    c
    for c in conv_relu.launch_configs()
    if ("dgrad" in c[0] or "wgrad" in c[0]) and "_fp64_" not in c[0] and c[0].endswith("i32") and "relu1" in c[0]
    and (names is None or c[0] in names)
]  # fmt: skip
for cc in archs:
    for r in compile_check.compile_all(cc, configs):
        keep = ("kernel", "cc", "registers", "stack_bytes", "shared_bytes", "wgmma")
        print(json.dumps({"triton": triton.__version__, **{k: r[k] for k in keep}}), flush=True)
