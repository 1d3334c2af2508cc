"""Compile every launchable Triton kernel config for given CUDA architectures, without a GPU.

``python -m fcnkern.kernels.compile_check 80 90`` prints one JSON line per (kernel, arch): shared memory, whether
the PTX declares local memory, which matrix instructions (mma / wgmma) it has, and the cubin's resources as
cuobjdump reads them: registers per thread and stack bytes per thread. The PTX cannot show register spills (ptxas's
register allocation makes them); the cubin's stack frame holds them, so STACK > 0 means spills or stack arrays.
``--ints-of-one`` compiles instead each kernel with all its integer arguments equal to 1 (see ``ones_variants``).
``--launched`` compiles the kernels exactly as a GPU launch for the FCN layers specialises them (conv + ReLU,
learned and bilinear upsampling, cross-entropy, fused head; see ``launched_variants``); ``--launched-conv`` the
conv + ReLU ones only (what test_build checks).
Must run with TRITON_INTERPRET unset: the interpreter replaces kernels with Python functions.

Why ``--launched``: the default records compile each config with no argument hints, the variant Triton builds for
misaligned pointers and strides. At a launch Triton marks each pointer and integer argument divisible by 16 as such
and turns integers equal to 1 (a channel stride of channels_last data) into constants, and only then can it
vectorise the operand loads into cp.async copies and pipeline them: conv3_2's bf16 forward compiles to 255
registers, 120 bytes of spills and one 24 KB shared-memory stage without hints, and to 137 registers, no spills and
three stages (72 KB) with its launch's.
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


# FCN-8s's convolutions at a 500 x 500 input: (layer, in channels, out channels, kernel, padding, input side, ReLU).
FCN8S_CONV_LAYERS = (
    ("conv1_1", 3, 64, 3, 100, 500, True),
    ("conv1_2", 64, 64, 3, 1, 698, True),
    ("conv2_1", 64, 128, 3, 1, 349, True),
    ("conv3_2", 256, 256, 3, 1, 175, True),
    ("conv4_1", 256, 512, 3, 1, 88, True),
    ("conv5_1", 512, 512, 3, 1, 44, True),
    ("fc6", 512, 4096, 7, 0, 22, True),
    ("fc7", 4096, 4096, 1, 0, 16, True),
    ("score_fr", 4096, 21, 1, 0, 16, False),
    ("score_pool4", 512, 21, 1, 0, 44, False),
)
# The learned upsampling layers (21 classes, kernel 2 x stride): (layer, stride, input side, crop, output side).
FCN_UPSAMPLE_LAYERS = (
    ("upscore2", 2, 16, 0, 34),  # FCN-8s at 500 x 500: score_fr's 16^2 -> 34^2, cropped later by the skip's offset
    ("upscore_pool4", 2, 34, 0, 70),
    ("upscore32", 32, 16, 19, 500),  # FCN-32s's final layer when learned
)
_POINTER_TYPES = {"torch.bfloat16": "*bf16", "torch.float16": "*fp16", "torch.float32": "*fp32", "torch.int64": "*i64"}


def _launch_specialization(fn, args: tuple, kwargs: dict):
    """(signature, constexprs, attrs, num_warps) of a launch of ``fn`` on ``args`` and ``kwargs``, as Triton's
    launcher (triton 3.6-3.9, runtime/jit.py) specialises them: pointers and integers divisible by 16 get
    ``tt.divisibility`` 16, integers equal to 1 become constants, booleans i1, other integers i32 (i64 past it)."""
    import torch

    kwargs = dict(kwargs)
    num_warps = kwargs.pop("num_warps")
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, value) in enumerate(zip(fn.arg_names, args, strict=False)):
        if isinstance(value, torch.Tensor):
            signature[name] = _POINTER_TYPES[str(value.dtype)]
            if value.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif value == 1:
            signature[name], constexprs[name] = "constexpr", 1
        else:
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    for name, value in kwargs.items():
        signature[name], constexprs[name] = "constexpr", value
    return signature, constexprs, attrs, num_warps


class _Capture:
    """Stands in for a @triton.jit kernel: ``kernel[grid](*args, **kwargs)`` records the launch instead."""

    def __init__(self, fn, launches: list):
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.fn, args, kwargs))


def _recorded_launches(modules, run) -> list:
    """The kernel launches (fn, args, kwargs) that ``run()`` makes from the @triton.jit kernels of ``modules``,
    which are replaced by recorders meanwhile (outputs stay unwritten: only the launches' arguments matter)."""
    from triton.runtime.jit import JITFunction

    kernels = [(m, name, fn) for m in modules for name, fn in vars(m).items() if isinstance(fn, JITFunction)]
    launches: list = []
    for module, name, fn in kernels:
        setattr(module, name, _Capture(fn, launches))
    try:
        run()
    finally:
        for module, name, fn in kernels:
            setattr(module, name, fn)
    return launches


def _conv_run(dtype, layer):
    import torch

    from fcnkern import conv_relu as launcher

    _, cin, cout, size, pad, side, relu = layer
    x = torch.empty(1, cin, side, side, dtype=dtype)
    w = torch.empty(cout, cin, size, size, dtype=dtype)
    geometry = ([1, 1], [pad, pad], [1, 1], 1, relu)
    y = launcher._triton_fwd._init_fn(x, w, torch.empty(cout, dtype=dtype), *geometry)
    launcher._triton_bwd._init_fn(torch.empty_like(y), y, x, w, *geometry, [True, True, True])


def _upsample_run(dtype, layer):
    import torch

    from fcnkern import upsample as launcher

    _, stride, side, crop, out = layer
    x = torch.empty(1, 21, side, side, dtype=dtype)
    w = torch.empty(21, 21, 2 * stride, 2 * stride, dtype=dtype)
    y = launcher._triton_upsample._init_fn(x, w, None, [stride, stride], [crop, crop], [out, out], 1)
    launcher._triton_upsample_bwd._init_fn(torch.empty_like(y), x, w, [stride, stride], [crop, crop], 1,
                                            [True, True, False])  # fmt: skip


def _head_run(dtype, layer):
    """The cross-entropy (training forward with its gradient, eval forward, the in-place scaling) on FCN-32s's
    1 x 21 x 500 x 500 logits, the fused head on its 1 x 21 x 17 x 17 scores, and the bilinear upsampling between."""
    import torch

    from fcnkern import cross_entropy, upsample, upsample_ce

    logits = torch.empty(1, 21, 500, 500, dtype=dtype)
    target = torch.zeros(1, 500, 500, dtype=torch.int64)
    scores = torch.empty(1, 21, 17, 17, dtype=dtype)
    _, grad = cross_entropy._triton_fwd_grad._init_fn(logits, target, None, 255)
    cross_entropy._triton_fwd._init_fn(logits, target, None, 255)
    cross_entropy._triton_scale_grad._init_fn(grad, torch.ones(1, dtype=torch.float32))
    upsample_ce._triton_fwd._init_fn(scores, target, None, 32, 19, 19, 255, True)
    upsample._triton_bilinear._init_fn(scores, 32, 19, 19, 500, 500)
    upsample._triton_bilinear_bwd._init_fn(logits, 32, 19, 19, 17, 17)


def launched_variants(conv_only: bool = False):
    """The Triton kernels that fcnkern's conv + ReLU launchers (forward, and backward with every gradient) start
    for each layer of ``FCN8S_CONV_LAYERS``, and unless ``conv_only`` the learned upsampling's for
    ``FCN_UPSAMPLE_LAYERS`` and the cross-entropy's, fused head's and bilinear upsampling's for FCN-32s's head
    (``_head_run``), batch 1, NCHW input, in bf16 and in fp32 (TF32, PyTorch's default for convolutions),
    specialised as a launch would (``_launch_specialization``): the launchers run on CPU tensors with the kernels
    replaced by recorders, and the GPU's dot precision is put back in place of the CPU interpreter's. Launches that
    specialise alike are compiled once."""
    import torch
    from fcnkern.kernels import conv_relu, cross_entropy, upsample, upsample_ce

    scenarios = [((conv_relu,), _conv_run, layer) for layer in FCN8S_CONV_LAYERS]
    if not conv_only:
        scenarios += [((upsample,), _upsample_run, layer) for layer in FCN_UPSAMPLE_LAYERS]
        scenarios.append(((cross_entropy, upsample, upsample_ce), _head_run, ("fcn32s_head",)))
    seen, names = set(), {}
    for dtype, precision in ((torch.bfloat16, "ieee"), (torch.float32, "tf32")):
        for modules, run, layer in scenarios:
            for fn, args, kwargs in _recorded_launches(modules, functools.partial(run, dtype, layer)):
                signature, constexprs, attrs, num_warps = _launch_specialization(fn, args, kwargs)
                if "DOT_PRECISION" in constexprs:
                    constexprs["DOT_PRECISION"] = precision
                key = (fn.__name__, str(signature), str(constexprs), str(attrs), num_warps)
                if key not in seen:
                    seen.add(key)
                    name = f"{fn.__name__.removesuffix('_kernel')}_{layer[0]}_{str(dtype)[6:]}"
                    names[name] = names.get(name, 0) + 1  # a second variant of one kernel for the same layer
                    name += f"_v{names[name]}" if names[name] > 1 else ""
                    yield name, fn, signature, constexprs, num_warps, attrs


def compile_all(cc: int, configs=None):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", cc, 32)
    for name, fn, signature, constexprs, num_warps, *attrs in configs or _launch_configs():
        sig = dict(signature)
        sig.update({k: "constexpr" for k in constexprs})
        src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs[0] if attrs else None)
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
            "cp_async": len(re.findall(r"cp\.async\.c[ag]", ptx)),
            "vector_loads": len(re.findall(r"ld\.global(?:\.\w+)*\.v[248]", ptx)),
            "vector_stores": len(re.findall(r"st\.global(?:\.\w+)*\.v[248]", ptx)),
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
    variants = {
        "--ints-of-one": ones_variants,
        "--launched": launched_variants,
        "--launched-conv": functools.partial(launched_variants, conv_only=True),
    }
    chosen = [variants[a] for a in argv if a in variants]
    for arch in [a for a in argv if a not in variants] or ["80", "90"]:
        for record in compile_all(int(arch), chosen[0]() if chosen else None):
            print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
