"""Compile every launchable Triton kernel config for given CUDA architectures, without a GPU.

``python -m fcnkern.kernels.compile_check 80 90`` prints one JSON line per (kernel, arch): shared memory, whether
the PTX uses local memory (register spills or stack arrays), and which matrix instructions (mma / wgmma) it has.
Must run with TRITON_INTERPRET unset: the interpreter replaces kernels with Python functions.
"""

from __future__ import annotations

import json
import os
import re
import sys

OP_MODULES = (
    "fcnkern.kernels.cross_entropy",
    "fcnkern.kernels.conv_relu",
    "fcnkern.kernels.upsample",
    "fcnkern.kernels.upsample_ce",
)


def compile_all(cc: int):
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", cc, 32)
    for module_name in OP_MODULES:
        module = importlib.import_module(module_name)
        for name, fn, signature, constexprs, num_warps in module.launch_configs():
            sig = dict(signature)
            sig.update({k: "constexpr" for k in constexprs})
            src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
            kernel = triton.compile(src, target=target, options={"num_warps": num_warps})
            ptx = kernel.asm["ptx"]
            yield {
                "kernel": name,
                "cc": cc,
                "shared_bytes": kernel.metadata.shared,
                "num_warps": num_warps,
                "local_memory": bool(re.search(r"\.local\b", ptx)),
                "mma": "mma.sync" in ptx,
                "wgmma": "wgmma" in ptx,
            }


def main(argv: list[str]) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("compile_check needs TRITON_INTERPRET unset", file=sys.stderr)
        return 2
    for arch in argv or ["80", "90"]:
        for record in compile_all(int(arch)):
            print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
