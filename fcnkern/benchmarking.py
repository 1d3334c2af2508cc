"""Timing and peak-memory measurement shared by ``pytest bench/`` and ``fcnkern bench``.

Peak memory: CUDA through the caching allocator's statistics; CPU through the process's resident-set high-water mark
(reset via /proc/self/clear_refs, Linux only).
"""

from __future__ import annotations

import contextlib
import statistics
import time
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


def _release_cpu_caches() -> None:
    """Make the resident-set peak count every allocation of the measured call: drop fcnkern's recycled output blocks
    and hand glibc's free heap pages back to the OS (malloc_trim), so that re-used memory is faulted in, and counted,
    again. Nothing here outlives the call: an earlier version fixed glibc's mmap threshold for good, and every
    timing taken after it paid page faults it would not otherwise pay."""
    import ctypes

    from fcnkern import _ext

    _ext.empty_cache()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: the peak may then miss re-used heap memory
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def peak_extra_bytes(fn: Callable[[], object], device: str) -> int | None:
    """Bytes by which one call of ``fn`` raises peak memory above what was allocated before it (None: unknown)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    _release_cpu_caches()
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


def median_ms(fn: Callable[[], object], device: str, rounds: int = 5, warmup: int = 1) -> float:
    """Median wall-clock milliseconds of ``fn`` over ``rounds`` calls (synchronised on CUDA), after ``warmup``."""
    run = synchronized(fn, device)
    for _ in range(warmup):
        run()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def run_interleaved(
    benchmark, steps: dict[str, Callable[[], object]], baseline: str, rounds: int = 7, per_turn: int = 1
) -> None:
    """Time ``steps`` (already synchronised) alternating round by round under pytest-benchmark, so that drift of a
    shared machine (a 2-core VM swings by 10-30 % over minutes) hits all of them alike. The benchmark's own time is
    one round of all steps; extra_info gets each step's median ms and, for each step but ``baseline``, the
    per-round speed-ups (baseline time / its time) and their median.

    ``per_turn`` > 1 runs each step that many times in a row per round and records only the last: the earlier calls
    re-warm what the other steps evicted (caches, oneDNN's primitive cache, freed pages), as a loop that runs one
    model alone would have them. With one call per turn a CPU FCN-8s step of the eager twin took 2.4-2.7 s where
    it took 1.8-2.1 s run alone."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    # A smoke run (--benchmark-disable) records nothing: one call per step shows the code runs, as re-warming and the
    # warm-up round would only add time (a CPU FCN-8s warm-turns smoke took 44 s with them).
    per_turn = 1 if benchmark.disabled else per_turn

    def one_round():
        for name, step in steps.items():
            for _ in range(per_turn - 1):
                step()
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)

    if not benchmark.disabled:
        one_round()  # warm-up, not recorded
        for t in times.values():
            t.clear()
    benchmark.pedantic(one_round, rounds=rounds, iterations=1)
    benchmark.extra_info["calls_per_turn"] = per_turn
    for name, t in times.items():
        benchmark.extra_info[f"{name}_median_ms"] = statistics.median(t) * 1e3
        if name != baseline:
            ratios = [b / a for a, b in zip(t, times[baseline], strict=True)]
            benchmark.extra_info[f"{name}_speedups"] = ratios
            benchmark.extra_info[f"{name}_speedup_median"] = statistics.median(ratios)


def cross_entropy_step(impl: str, logits: torch.Tensor, target: torch.Tensor, mode: str) -> Callable[[], object]:
    """One timed cross-entropy call (summed, ignore label 255): ``impl`` is "torch" (F.cross_entropy) or an fcnkern
    backend name; ``mode`` is "fwd" (no autograd) or "fwd+bwd" (the gradient is dropped after each call, not
    before, so that a measured peak includes it)."""
    import torch.nn.functional as F

    import fcnkern

    def loss(x):
        if impl == "torch":
            return F.cross_entropy(x, target, ignore_index=255, reduction="sum")
        return fcnkern.pixelwise_cross_entropy(x, target, reduction="sum", backend=impl)

    if mode == "fwd":

        def step():
            with torch.no_grad():
                return loss(logits)

        return step
    x = logits.detach().requires_grad_()

    def step():
        loss(x).backward()
        x.grad = None

    return step
