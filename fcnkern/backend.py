"""Backend registry and selection.

Four backends compute every op:

- ``triton``: Triton kernels (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``, for testing),
- ``cuda``: the C++/CUDA extension (CUDA tensors),
- ``cpu``: the C++ extension's CPU kernels (CPU tensors),
- ``torch``: the pure-PyTorch reference (any device).

Which one runs is decided, first match wins, by the op's ``backend=`` argument, the innermost
``with fcnkern.use_backend(...)`` block, the ``FCNKERN_BACKEND`` environment variable, and otherwise by the tensors'
device, among the backends the op has kernels for: on CPU tensors cpu, then torch; on CUDA tensors the fastest
measured on an H100 (``_CUDA_AUTO_ORDER``; bench/results/h100-*). A backend that is named explicitly but cannot run
(or has no kernel for that op) raises :class:`BackendUnavailableError` saying why; only the automatic choice moves on
to the next candidate.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch

BACKENDS = ("triton", "cuda", "cpu", "torch")
_AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}
# The automatic choice on CUDA tensors, per op, fastest first, from the H100 benchmarks in bench/results/ (training
# steps: forward + backward). fcnkern's conv kernels lose to cuDNN (per VGG layer in training, Triton 2-36x slower,
# the C++ kernel 6-70x; issue 3), so the automatic choice keeps PyTorch's convolution; explicit choices still run them.
_CUDA_AUTO_ORDER = {
    "conv2d_relu": ("torch", "triton", "cuda"),
    "upsample_crop": ("triton", "cuda", "torch"),  # the C++ kernel: 3-10x slower than Triton in training
}


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that cannot run here or on these tensors."""


@dataclass(frozen=True)
class BackendInfo:
    """Whether a backend can run in this process, and why not when it cannot."""

    name: str
    available: bool
    reason: str


def triton_interpreter() -> bool:
    """True when Triton kernels run in the interpreter on CPU tensors (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check_triton() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton; Linux x86_64 only)"
    if not torch.cuda.is_available() and not triton_interpreter():
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels in the interpreter on CPU tensors)"
    return None


def _check_extension(need_cuda: bool) -> str | None:
    from fcnkern import _ext

    status = _ext.load()
    if status.error is not None:
        return status.error
    if need_cuda:
        if not status.with_cuda:
            return f"the C++ extension was built without CUDA ({status.origin})"
        if not torch.cuda.is_available():
            return "no CUDA device"
    return None


_CHECKS = {
    "triton": _check_triton,
    "cuda": lambda: _check_extension(need_cuda=True),
    "cpu": lambda: _check_extension(need_cuda=False),
    "torch": lambda: None,
}


@functools.cache
def _unavailable_reason(name: str) -> str | None:
    return _CHECKS[name]()


def backend_info(name: str) -> BackendInfo:
    """Availability of one backend (loading, or compiling, the C++ extension if that is what it takes)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    reason = _unavailable_reason(name)
    return BackendInfo(name, reason is None, reason or "available")


def backends() -> dict[str, BackendInfo]:
    """Every backend with whether it can run here, and why not when it cannot."""
    return {name: backend_info(name) for name in BACKENDS}


_local = threading.local()


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Run fcnkern ops in this block on backend ``name`` (None: automatic choice). Nests; thread-local."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    stack = _local.__dict__.setdefault("stack", [])
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def requested_backend(explicit: str | None = None) -> str | None:
    """The backend asked for by argument, ``use_backend`` or ``FCNKERN_BACKEND``; None means automatic."""
    if explicit is not None:
        return explicit
    stack = getattr(_local, "stack", None)
    if stack and stack[-1] is not None:
        return stack[-1]
    env = os.environ.get("FCNKERN_BACKEND", "").strip()
    return env if env and env != "auto" else None


def _device_problem(name: str, device: torch.device) -> str | None:
    if name == "cpu" and device.type != "cpu":
        return f"the cpu backend runs on CPU tensors, got {device.type} tensors"
    if name == "cuda" and device.type != "cuda":
        return f"the cuda backend runs on CUDA tensors, got {device.type} tensors"
    if name == "triton" and device.type != "cuda" and not (device.type == "cpu" and triton_interpreter()):
        return f"the triton backend runs on CUDA tensors (CPU tensors only with TRITON_INTERPRET=1), got {device.type}"
    return None


@torch.compiler.assume_constant_result
def resolve(
    explicit: str | None, device_type: str, op: str = "this op", implemented: tuple[str, ...] = BACKENDS
) -> str:
    """The backend that runs ``op`` on tensors of ``device_type``, among the backends it has kernels for
    (``implemented``). Under torch.compile this is decided once, at trace time, like any other Python-level
    choice."""
    device = torch.device(device_type)
    name = requested_backend(explicit)
    if name is None:
        order = _CUDA_AUTO_ORDER.get(op) if device.type == "cuda" else None
        for candidate in order or _AUTO_ORDER.get(device.type, ("torch",)):
            if (
                candidate in implemented
                and _device_problem(candidate, device) is None
                and _unavailable_reason(candidate) is None
            ):
                return candidate
        return "torch"
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name not in implemented:
        raise BackendUnavailableError(
            f"fcnkern backend {name!r} has no kernel for {op} yet (it has: {', '.join(implemented)})"
        )
    problem = _device_problem(name, device) or _unavailable_reason(name)
    if problem is not None:
        raise BackendUnavailableError(f"fcnkern backend {name!r} is not available: {problem}")
    return name
