"""Peak-memory measurement for the benchmarks: CUDA through the caching allocator's statistics, CPU through the
process's resident-set high-water mark (reset via /proc/self/clear_refs, Linux only)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def peak_extra_bytes(fn: Callable[[], object], device: str) -> int | None:
    """Bytes by which one call of ``fn`` raises peak memory above what was allocated before it (None: unknown)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    before = _status_bytes("VmRSS:")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        return None
    fn()
    peak = _status_bytes("VmHWM:")
    return None if before is None or peak is None else max(0, peak - before)


def synchronized(fn: Callable[[], object], device: str) -> Callable[[], object]:
    """fn followed by a device sync, so that wall-clock timing covers the GPU work."""
    if device != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run
