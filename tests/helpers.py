"""Shared test helpers: which (device, backend) pairs to run, reference comparisons, random inputs."""

from __future__ import annotations

import zlib

import pytest
import torch

import fcnkern
from fcnkern.backend import _device_problem

DEVICE_BACKENDS = {"cpu": ("cpu", "triton", "torch"), "cuda": ("cuda", "triton", "torch")}
LOW_PRECISION = (torch.float16, torch.bfloat16)
# Unit roundoff: the error of rounding one exact result to the dtype.
UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24, torch.float64: 2.0**-53}


def skip_reason(device: str, backend: str) -> str | None:
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    info = fcnkern.backend_info(backend)
    if not info.available:
        return f"backend {backend!r} unavailable: {info.reason}"
    return _device_problem(backend, torch.device(device))


def device_backend_params(op: str = "", implemented: tuple[str, ...] = fcnkern.BACKENDS, issue: int = 0) -> list:
    """Every (device, backend) pair, skipped with the reason where it cannot run here, or where ``op`` has no kernel
    on that backend yet (``implemented`` lists the ones it has; ``issue`` is where the rest is tracked)."""
    params = []
    for device, names in DEVICE_BACKENDS.items():
        for backend in names:
            reason = skip_reason(device, backend)
            if backend not in implemented and reason != "no CUDA device":
                reason = f"no {backend} kernel for {op} yet (issue {issue})"
            marks = [pytest.mark.skip(reason=reason)] if reason else []
            params.append(pytest.param(device, backend, marks=marks, id=f"{device}-{backend}"))
    return params


def require_backend(backend: str) -> None:
    """Skip (with the reason) where ``backend`` cannot run here; for tests that draw the backend themselves."""
    info = fcnkern.backend_info(backend)
    if not info.available:
        pytest.skip(f"backend {backend!r} unavailable: {info.reason}")


def interpreted(backend: str, device: str = "cpu") -> bool:
    """Whether this backend runs in the Triton interpreter here (Triton on CPU tensors), where each kernel launch
    costs milliseconds per program: gradchecks there take gradcheck's fast mode (random projections of the
    Jacobian) instead of a backward per output element and a forward per input element."""
    return backend == "triton" and device == "cpu"


def split_examples(ways: int):
    """Hypothesis settings that give each of ``ways`` parametrized copies of a property test an equal share of the
    profile's examples (at least 10): parametrizing the backend then shows each one's skip reason without
    multiplying the test's time."""
    from hypothesis import settings

    return settings(max_examples=max(10, settings().max_examples // ways))


def draw_window(data, full: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """Hypothesis: a random crop (top, left) and a non-empty window size that fits inside a ``full``-sized output."""
    from hypothesis import strategies as st

    crop = tuple(data.draw(st.integers(0, n - 1)) for n in full)
    size = tuple(data.draw(st.integers(1, n - c)) for n, c in zip(full, crop, strict=True))
    return crop, size  # type: ignore[return-value]


LAYOUTS = ("contiguous", "channels_last", "strided")


def memory_layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """t's values (N x C x H x W) in another memory layout: "contiguous", "channels_last", or "strided" (every other
    element of a twice-as-wide row: a non-contiguous view with a column stride of 2)."""
    if kind == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if kind == "strided":
        return torch.stack([t, t], dim=-1).flatten(-2)[..., ::2]
    if kind == "contiguous":
        return t.contiguous()
    raise ValueError(f"unknown layout {kind!r}")


def fcn_and_twin(variant: str, backend: str | None, key: tuple, width: float = 1 / 16, **kwargs):
    """An FCN on fcnkern's layers and its pure-PyTorch twin (``to_twin()``), both in eval mode. The score
    layers start at zero in the paper; here they are random (from ``generator(*key)``), so that every path of the
    network shows in the output. ``kwargs`` go to both (num_classes, at_once, ...)."""
    from fcnkern import models

    torch.manual_seed(0)
    model = models.FCN(variant, backend=backend, width=width, **kwargs)
    g = generator(*key)
    state = {
        k: torch.randn(v.shape, generator=g) * 0.1 if k.startswith("score") else v
        for k, v in model.state_dict().items()
    }
    model.load_state_dict(state)
    model.eval()
    return model, model.to_twin()


def generator(*key) -> torch.Generator:
    """A generator seeded from the test's parameters: inputs differ between cases and repeat between runs."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere counts as infinitely wrong."""
    out, ref = out.detach().double(), ref.detach().double()
    if torch.isnan(out).any() and not torch.isnan(ref).any():
        return float("inf")
    diff = torch.linalg.vector_norm(torch.nan_to_num(out - ref))
    scale = torch.linalg.vector_norm(ref)
    return float(diff / scale) if scale > 0 else float(diff)


# Tight fp32 bound: both sides round differently, but far below anything a wrong formula would produce.
FP32_TOL = 1e-5


def assert_fp32_ok(ours: torch.Tensor, torch_way: torch.Tensor, ref: torch.Tensor, what: str):
    """fp32 results, judged against the fp64 reference: within FP32_TOL, or no worse than twice PyTorch's own fp32
    error where fp32 itself cannot do better (softmax - onehot cancels when a probability is close to 1)."""
    e_ours, e_torch = rel_err(ours, ref), rel_err(torch_way, ref)
    bound = max(FP32_TOL, 2 * e_torch)
    assert e_ours <= bound, f"{what}: rel. error {e_ours:.3g} > {bound:.3g} (PyTorch's own fp32: {e_torch:.3g})"


def assert_low_precision_ok(ours: torch.Tensor, torch_way: torch.Tensor, ref: torch.Tensor, dtype, what: str):
    """fp16/bf16 results, judged against the fp64 reference: no worse than twice PyTorch's own low-precision error,
    with a floor of a few roundings of the output dtype (PyTorch can be exact by luck, e.g. on one class)."""
    e_ours, e_torch = rel_err(ours, ref), rel_err(torch_way, ref)
    bound = 2 * e_torch + 4 * UNIT_ROUNDOFF[dtype]
    assert e_ours <= bound, f"{what}: rel. error {e_ours:.3g} > {bound:.3g} (PyTorch's own: {e_torch:.3g})"


def load_cpu_check(name: str, source: str, functions: list[str]):
    """Compile a CPU build of CUDA index maths from cpp/'s headers and return its ops (``torch.ops.<name>``, one
    per entry of ``functions``, their schemas inferred from the C++ signatures). Skips only where there is no C++
    compiler: a compile error in those headers fails the test instead of hiding as a skip.

    The ops are registered with TORCH_LIBRARY, not bound with pybind11 as load_inline's ``functions=`` would: that
    needs torch/extension.h (the C++ frontend and pybind11), which took about half of each build: 28-37 s -> 16 s
    per check on CI's 2-core VM."""
    import hashlib
    import os
    import shutil
    import tempfile
    from pathlib import Path

    from torch.utils.cpp_extension import load

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        pytest.skip(f"no C++ compiler ({compiler}) to build the CPU check of the CUDA index maths")
    cpp = Path(__file__).resolve().parents[1] / "cpp"
    # torch's build cache hashes the source, not the headers it includes: stamp their digest into it so that an
    # edited header rebuilds the check instead of loading the last build.
    digest = hashlib.sha256(b"".join(h.read_bytes() for h in sorted(cpp.glob("*.h")))).hexdigest()[:16]
    defs = "\n".join(f'  m.def("{f}", &{f});' for f in functions)
    text = f"{source}\n#include <torch/library.h>\nTORCH_LIBRARY({name}, m) {{\n{defs}\n}}\n// cpp/*.h {digest}\n"
    # A stable path, rewritten only when the text changes: ninja rebuilds on a newer source file.
    path = Path(tempfile.gettempdir()) / f"fcnkern-checks-{os.getuid()}" / f"{name}.cpp"
    path.parent.mkdir(exist_ok=True)
    if not path.exists() or path.read_text() != text:
        scratch = path.with_suffix(f".{os.getpid()}.tmp")
        scratch.write_text(text)
        scratch.replace(path)  # atomic: another xdist worker may build the same check
    load(name, [str(path)], extra_include_paths=[str(cpp)], extra_cflags=["-O1"], is_python_module=False,
         verbose=False)  # fmt: skip
    return getattr(torch.ops, name)
