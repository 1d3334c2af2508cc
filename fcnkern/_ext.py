"""Loading the C++/CUDA extension that registers the ``torch.ops.fcnkern.*`` operators.

``setup.py`` compiles it ahead of time into ``fcnkern._C`` when torch is present at build time. Otherwise (or
when that build does not load against the installed torch) it is compiled on first use with
``torch.utils.cpp_extension.load``: once, with a one-line message, and cached under ``TORCH_EXTENSIONS_DIR``.
``FCNKERN_NO_JIT=1`` forbids that compilation; the ``cpu`` and ``cuda`` backends then report themselves unavailable.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch

from fcnkern import _build_config as cfg


@dataclass(frozen=True)
class ExtensionStatus:
    """The loaded extension module (None if it could not be loaded), where it came from, and what it has."""

    module: ModuleType | None
    origin: str
    with_cuda: bool
    error: str | None


_lock = threading.Lock()
_status: ExtensionStatus | None = None
_on_load: list[Callable[[], None]] = []


def on_load(callback: Callable[[], None]) -> None:
    """Run ``callback`` once the extension's operators exist (now, if they already do). Op modules use it to
    register their fake kernels and autograd formulas on the C++ operators."""
    if _status is not None and _status.module is not None:
        callback()
    else:
        _on_load.append(callback)


def maybe_poison(out: torch.Tensor) -> torch.Tensor:
    """Fill a fresh output with NaN when ``FCNKERN_POISON=1`` (tests), so unwritten elements show; the Python-side
    twin of ``maybe_poison`` in cpp/common.h."""
    if os.environ.get("FCNKERN_POISON", "0") == "1" and out.numel() > 0:
        out.fill_(float("nan"))
    return out


def _jit_compile(prebuilt_error: str) -> ModuleType:
    from torch.utils import cpp_extension

    src = cfg.source_dir()
    no_cuda = cfg.cuda_build_reason(torch.version.cuda)
    sources = [str(src / name) for name in cfg.CPP_SOURCES]
    cflags = list(cfg.CXX_FLAGS)
    if no_cuda is None:
        sources += [str(src / name) for name in cfg.CUDA_SOURCES]
        cflags.append("-DFCNKERN_WITH_CUDA")
        if not torch.cuda.is_available():
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", cfg.CUDA_ARCH_LIST)
    build_dir = cpp_extension._get_build_directory("fcnkern_C", verbose=False)
    what = "C++/CUDA" if no_cuda is None else "C++ (CPU only: " + no_cuda + ")"
    if os.path.exists(os.path.join(build_dir, "fcnkern_C.so")):
        message = (
            f"loading the {what} extension compiled on first use from {build_dir} (recompiled first if its "
            "sources changed)"
        )
    else:
        message = f"compiling the {what} extension on first use, once (a few minutes); cached in {build_dir}"
    print(f"fcnkern: {message} (no prebuilt one: {prebuilt_error})", file=sys.stderr, flush=True)
    return cpp_extension.load(
        name="fcnkern_C",
        sources=sources,
        extra_cflags=cflags,
        extra_cuda_cflags=list(cfg.NVCC_FLAGS),
        extra_ldflags=list(cfg.LINK_FLAGS),
        extra_include_paths=[str(src), *cfg.extra_include_dirs()],
        with_cuda=no_cuda is None,
        verbose=False,
    )


def _load_uncached() -> ExtensionStatus:
    try:
        from fcnkern import _C as module

        origin = f"prebuilt {module.__file__}"
    except ImportError as exc:
        if os.environ.get("FCNKERN_NO_JIT", "0") == "1":
            return ExtensionStatus(None, "none", False, f"no prebuilt extension ({exc}) and FCNKERN_NO_JIT=1")
        try:
            module = _jit_compile(str(exc).splitlines()[0])
        except Exception as jit_exc:  # a failed compile must surface as a reason, not kill `import fcnkern`
            first = str(jit_exc).strip().splitlines()[:3]
            return ExtensionStatus(None, "none", False, "compiling the C++ extension failed: " + " | ".join(first))
        origin = f"compiled on first use {module.__file__}"
    return ExtensionStatus(module, origin, bool(getattr(module, "with_cuda", False)), None)


def load() -> ExtensionStatus:
    """Load (or compile) the extension once per process and return its status; never raises."""
    global _status
    if _status is not None:
        return _status
    with _lock:
        if _status is None:
            status = _load_uncached()
            _status = status
            if status.module is not None:
                for callback in _on_load:
                    callback()
                _on_load.clear()
    return _status


def empty_cache() -> int:
    """Return the CPU kernels' cached large output blocks and their kept scratch block to the OS (see
    cpp/large_block_cache.h); returns the number of bytes released (0 when the extension is not loaded)."""
    if _status is None or _status.module is None:
        return 0
    return int(_status.module.empty_cache())


def cpu_gemm_library() -> str:
    """The library the CPU backend's fp32 GEMMs go to: "onednn" (ATen's oneDNN matmul, the default where this torch
    has it) or "mkl" (at::mm). ``FCNKERN_CPU_GEMM=mkl|onednn`` chooses; read once per process. Loads the extension;
    raises if it cannot load."""
    status = load()
    if status.module is None:
        raise RuntimeError(f"the fcnkern C++ extension is unavailable: {status.error}")
    return str(status.module.cpu_gemm_library())


def load_prebuilt_quietly() -> None:
    """At import time: load the ahead-of-time build if there is one (fast), but never start a compilation."""
    global _status
    if _status is not None:
        return
    try:
        from fcnkern import _C  # noqa: F401
    except ImportError:
        return
    load()
