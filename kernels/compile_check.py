"""Compile every launchable Triton kernel config for given CUDA architectures, without a GPU.

``python -m fcnkern.kernels.compile_check 80 90`` prints one JSON line per (kernel, arch): shared memory, whether
the PTX declares local memory, which matrix instructions (mma / wgmma) it has, and the cubin's resources as
cuobjdump reads them: registers per thread and stack bytes per thread. The PTX cannot show register spills (ptxas's
register allocation makes them); the cubin's stack frame holds them, so STACK > 0 means spills or stack arrays.
``--ints-of-one`` compiles instead each kernel with all its integer arguments equal to 1 (see ``ones_variants``).
Must run with TRITON_INTERPRET unset: the interpreter replaces kernels with Python functions.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

_RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+)")

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
            **cubin_resources(kernel.asm["cubin"]),
        }


@functools.cache
def _cuobjdump() -> str:
    import triton

    from fcnkern._build_config import cuda_home

    for path in (os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"),
                 os.path.join(cuda_home(), "bin", "cuobjdump")):  # fmt: skip
        if os.access(path, os.X_OK):
            return path
    found = shutil.which("cuobjdump")
    if found is None:
        raise RuntimeError("compile_check needs cuobjdump (Triton's NVIDIA backend or the CUDA toolkit has it)")
    return found


def cubin_resources(cubin: bytes) -> dict[str, int]:
    """Registers and stack bytes per thread of the one kernel in a cubin (``cuobjdump -res-usage``). Read from the
    cubin rather than ptxas's log so that a kernel served from Triton's cache reports them too."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    found = _RESOURCES.findall(out)
    if len(found) != 1:
        raise RuntimeError(f"expected one kernel's resource usage from cuobjdump, got: {out}")
    return {"registers": int(found[0][0]), "stack_bytes": int(found[0][1])}


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
