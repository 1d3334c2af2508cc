"""Compile every launchable Triton kernel config for given CUDA architectures, without a GPU.

``python -m fcnkern.kernels.compile_check 80 90`` prints one JSON line per (kernel, arch): shared memory, whether
the PTX uses local memory (register spills or stack arrays), and which matrix instructions (mma / wgmma) it has.
``--ints-of-one`` compiles instead each kernel with all its integer arguments equal to 1 (see ``ones_variants``).
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


def _launch_configs():
    import importlib

    for module_name in OP_MODULES:
        yield from importlib.import_module(module_name).launch_configs()


def ones_variants():
    """Each kernel with every integer argument equal to 1, once per combination of its flag constexprs: at launch
    Triton turns an int argument of value 1 (a unit stride, C = 1, N = 1) into a constexpr Python int, on which
    tensor methods such as ``.to()`` do not exist (a compile error only a GPU run would otherwise show)."""
    seen = set()
    for name, fn, signature, constexprs, num_warps in _launch_configs():
        flags = tuple(sorted((k, v) for k, v in constexprs.items() if isinstance(v, bool)))
        if (fn, flags) in seen:
            continue
        seen.add((fn, flags))
        ints = {k: 1 for k, ty in signature.items() if ty in ("i32", "i64")}
        yield f"{name}_ints1", fn, signature, {**constexprs, **ints}, num_warps  # compile_all marks them constexpr


def compile_all(cc: int, configs=None):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", cc, 32)
    for name, fn, signature, constexprs, num_warps in configs or _launch_configs():
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
    ones = "--ints-of-one" in argv
    for arch in [a for a in argv if a != "--ints-of-one"] or ["80", "90"]:
        for record in compile_all(int(arch), ones_variants() if ones else None):
            print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
