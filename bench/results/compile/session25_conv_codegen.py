"""Compile conv configs (names with relu1 -> mapped to current names) and print resources + PTX op counts."""
import json, re, sys
from fcnkern.kernels.compile_check import _launch_configs, compile_all
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
pat = re.compile(sys.argv[2])
cc = int(sys.argv[1])
for cfg in _launch_configs():
    name = cfg[0]
    if not pat.search(name):
        continue
    _, fn, signature, constexprs, warps = cfg
    sig = dict(signature); sig.update({k: "constexpr" for k in constexprs})
    kern = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=GPUTarget("cuda", cc, 32), options={"num_warps": warps})
    ptx = kern.asm["ptx"]
    from fcnkern.kernels.compile_check import cubin_resources
    counts = {k: len(re.findall(p, ptx)) for k, p in (("lines", r"\n"), ("cp_async", r"cp\.async\.cg|cp\.async\.ca|cp\.async\.bulk"), ("ld_global", r"ld\.global"), ("wgmma", r"wgmma\.mma_async"), ("mma", r"mma\.sync"), ("setp", r"setp\."), ("selp", r"selp\."))}
    print(json.dumps({"name": name, "cc": cc, "shared": kern.metadata.shared, **cubin_resources(kern.asm["cubin"]), **counts}), flush=True)
