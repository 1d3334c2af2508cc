"""Every Triton launch the op launchers make is a config the compile check compiles for sm_80 and sm_90.

The launchers (fcnkern/*.py) pick block shapes and constexprs; each kernel module's ``launch_configs()`` lists what
fcnkern.kernels.compile_check compiles. The two are written apart, so this test drives every Triton op, forward
and backward, over the inputs that steer those choices (dtypes, channel and class counts, weights, biases, groups,
strides, factors, reductions) with each kernel replaced by a recorder: nothing runs, and each launch's constexprs,
num_warps, pointer dtypes and bool (run-time switch) arguments must equal one listed config's. Integer arguments
are not compared: a value of 1 becomes a constexpr at launch (test_build's integers-of-one check) and the 64-bit
index plan is chosen by tensor size (launch_configs compiles it for one block shape per kernel, the widest: the
same code with wider integers).
"""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch
from fcnkern.kernels.compile_check import OP_MODULES

import fcnkern

triton = pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
                 torch.int64: "i64", torch.int32: "i32"}  # fmt: skip
_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas")


class _Recorder:
    """Stands in for a Triton kernel: ``kernel[grid](*args, **kwargs)`` records the launch and runs nothing."""

    def __init__(self, kernel, launches: list):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.kernel, args, kwargs))


def _is_kernel(obj) -> bool:
    return type(obj).__name__ in ("JITFunction", "InterpretedFunction")


@pytest.fixture
def launches(monkeypatch):
    """(configs by kernel, the list every launch is appended to) with every kernel of OP_MODULES recorded."""
    configs: dict = {}
    recorded: list = []
    for module_name in OP_MODULES:
        module = importlib.import_module(module_name)
        for _, kernel, signature, constexprs, num_warps in module.launch_configs():
            typed = {k: v for k, v in signature.items() if v.startswith("*") or v == "u1"}  # pointers and bools
            configs.setdefault(kernel, []).append((constexprs, num_warps, typed))
        for attr, obj in list(vars(module).items()):
            if _is_kernel(obj):
                monkeypatch.setattr(module, attr, _Recorder(obj, recorded))
    return configs, recorded


def _unlisted(configs: dict, recorded: list) -> list[str]:
    """The recorded launches that match no config, described."""
    missing = []
    for kernel, args, kwargs in recorded:
        params = list(inspect.signature(kernel.fn).parameters)
        constexprs = {k: v for k, v in kwargs.items() if k not in _LAUNCH_OPTIONS}
        if constexprs.get("DOT_PRECISION") == "upcast":  # the CPU interpreter's stand-in for bf16's "ieee" dot
            constexprs["DOT_PRECISION"] = "ieee"
        num_warps = kwargs.get("num_warps", 4)
        # Positional arguments only: the constexprs come as keywords.
        positional = list(zip(params, args, strict=False))
        typed = {name: f"*{_TRITON_TYPES[a.dtype]}" for name, a in positional if isinstance(a, torch.Tensor)}
        # Run-time switches ("u1") must arrive as Python bools: an int 1 would be specialised into a constexpr,
        # another kernel than the one compiled.
        typed.update({name: "u1" for name, a in positional if isinstance(a, bool)})
        if not any(c == constexprs and w == num_warps and t == typed for c, w, t in configs.get(kernel, [])):
            missing.append(f"{kernel.fn.__name__} {constexprs} num_warps={num_warps} {typed}")
    return missing


def _check(launches, drive) -> None:
    configs, recorded = launches
    drive()
    assert recorded, "no Triton launch was recorded: the test drives nothing"
    missing = sorted(set(_unlisted(configs, recorded)))
    assert not missing, f"{len(missing)} launched configs the compile check does not compile, e.g. {missing[:3]}"


def _randn(*shape, dtype, grad=True, g=None):
    return torch.randn(*shape, generator=g, dtype=torch.float32).to(DEVICE, dtype).requires_grad_(grad)


def _backward(out: torch.Tensor, *inputs: torch.Tensor) -> None:
    torch.autograd.grad(out, [t for t in inputs if t is not None and t.requires_grad], torch.ones_like(out))


def test_conv2d_relu_launches_are_compiled(launches):
    g = torch.Generator().manual_seed(0)

    def drive():
        # (C_in, C_out, kernel, groups): an RGB first layer (flattened reduction), 21 classes, 64 and wide
        # channel counts (each BLOCK_N), grouped and depthwise, 1x1.
        shapes = ((3, 8, 3, 1), (16, 21, 3, 1), (32, 64, 3, 1), (20, 96, 3, 1), (8, 8, 3, 2), (6, 6, 3, 6),
                  (64, 21, 1, 1))  # fmt: skip
        for dtype in DTYPES:
            for c, k, r, groups in shapes:
                for stride in (1, 2):
                    for relu in (True, False):
                        for has_bias in (True, False):
                            x = _randn(2, c, 7, 6, dtype=dtype, g=g)
                            w = _randn(k, c // groups, r, r, dtype=dtype, g=g)
                            b = _randn(k, dtype=dtype, g=g) if has_bias else None
                            y = fcnkern.conv2d_relu(x, w, b, stride, 1, 1, groups, relu=relu, backend="triton")
                            _backward(y, x, w, b)

    _check(launches, drive)


def test_upsample_launches_are_compiled(launches):
    g = torch.Generator().manual_seed(1)

    def drive():
        # (C_in, C_out, groups, factor): FCN's per-class 21-channel layers (full and depthwise), narrow layers below
        # the tensor-core width, a single channel, and the 2x / 8x / 32x factors.
        layers = ((21, 21, 1, 2), (21, 21, 21, 2), (21, 21, 1, 32), (3, 5, 1, 4), (1, 1, 1, 8), (16, 16, 2, 2),
                  (40, 40, 1, 8))  # fmt: skip
        for dtype in DTYPES:
            for cin, cout, groups, f in layers:
                for has_bias in (True, False):
                    x = _randn(2, cin, 3, 4, dtype=dtype, g=g)
                    w = _randn(cin, cout // groups, 2 * f, 2 * f, dtype=dtype, g=g)
                    b = _randn(cout, dtype=dtype, g=g) if has_bias else None
                    size = (3 * f - 1, 4 * f - 3)
                    y = fcnkern.upsample_crop(x, w, f, (1, 2), size, bias=b, groups=groups, backend="triton")
                    _backward(y, x, w, b)
            for c, f, h, w, size in ((21, 32, 2, 2, (41, 29)), (21, 8, 5, 4, (7, 23)), (2, 2, 3, 37, (5, 70)),
                                     (2, 40, 2, 20, (61, 601)), (1, 4, 6, 3, (23, 13))):  # fmt: skip
                x = _randn(2, c, h, w, dtype=dtype, g=g)
                _backward(fcnkern.bilinear_upsample_crop(x, f, (1, 1), size, backend="triton"), x)

    _check(launches, drive)


def test_cross_entropy_launches_are_compiled(launches):
    g = torch.Generator().manual_seed(2)

    def drive():
        for dtype in DTYPES:
            for c in (1, 2, 3, 5, 9, 21, 32, 33, 150):  # every class-chunk width, one chunk and several
                for weighted in (False, True):
                    for reduction in ("sum", "mean", "none"):
                        x = _randn(2, c, 5, 7, dtype=dtype, g=g)
                        t = torch.randint(0, c, (2, 5, 7), generator=g).to(DEVICE)
                        w = torch.rand(c, generator=g).to(DEVICE) + 0.5 if weighted else None
                        loss = fcnkern.pixelwise_cross_entropy(x, t, w, reduction=reduction, backend="triton")
                        _backward(loss, x)

    _check(launches, drive)


def test_upsample_cross_entropy_launches_are_compiled(launches):
    g = torch.Generator().manual_seed(3)

    def drive():
        for dtype in DTYPES:
            for c, f, crop, size in ((21, 32, (19, 19), (41, 29)), (21, 8, (31, 3), (7, 23)), (3, 2, (0, 0), (9, 11)),
                                     (40, 4, (1, 2), (13, 10)), (5, 16, (9, 0), (17, 31))):  # fmt: skip
                for weighted in (False, True):
                    for reduction in ("sum", "mean", "none"):
                        h, w = (size[0] + crop[0]) // f + 2, (size[1] + crop[1]) // f + 2
                        scores = _randn(2, c, h, w, dtype=dtype, g=g)
                        t = torch.randint(0, c, (2, *size), generator=g).to(DEVICE)
                        wt = torch.rand(c, generator=g).to(DEVICE) + 0.5 if weighted else None
                        loss = fcnkern.upsample_cross_entropy(scores, t, f, crop, weight=wt, reduction=reduction,
                                                              backend="triton")  # fmt: skip
                        _backward(loss, scores)

    _check(launches, drive)
