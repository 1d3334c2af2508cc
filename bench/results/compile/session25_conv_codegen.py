"""Compile the launch configs whose names match a regex for one architecture, without a GPU, and print per kernel:
shared memory, registers and stack bytes (cuobjdump on the cubin) and counts of PTX instructions of interest.

    python bench/results/compile/session25_conv_codegen.py 90 'conv_dgrad_fp16_.*_i32$'
"""

import json
import re
import sys

import triton
from fcnkern.kernels.compile_check import _launch_configs, cubin_resources
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

PTX_COUNTS = {
    "lines": r"\n",
    "cp_async": r"cp\.async\.cg|cp\.async\.ca|cp\.async\.bulk",
    "ld_global": r"ld\.global",
    "wgmma": r"wgmma\.mma_async",
    "mma": r"mma\.sync",
    "setp": r"setp\.",
    "selp": r"selp\.",
}


def main(cc: int, pattern: str) -> None:
    wanted = re.compile(pattern)
    for name, fn, signature, constexprs, warps in _launch_configs():
        if not wanted.search(name):
            continue
        sig = {**signature, **dict.fromkeys(constexprs, "constexpr")}
        src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
        kernel = triton.compile(src, target=GPUTarget("cuda", cc, 32), options={"num_warps": warps})
        ptx = kernel.asm["ptx"]
        counts = {key: len(re.findall(p, ptx)) for key, p in PTX_COUNTS.items()}
        record = {"name": name, "cc": cc, "shared": kernel.metadata.shared, **cubin_resources(kernel.asm["cubin"])}
        print(json.dumps({**record, **counts}), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
