"""The C++ CPU kernels called from several Python threads at once (a server running inference in threads, a data
loader's workers): each call must give bitwise the result it gives alone. The kernels are deterministic for a
given number of OpenMP threads, and their shared state (the large-block cache, lent to one call at a time; the
GEMM library choice) must not leak between concurrent calls."""

from __future__ import annotations

import threading

import torch
from helpers import generator, require_backend

import fcnkern


def _conv(g: torch.Generator, c: int, k: int, hw: int, stride: int) -> list[torch.Tensor]:
    x = torch.randn(2, c, hw, hw + 3, generator=g, requires_grad=True)
    w = (torch.randn(k, c, 3, 3, generator=g) * 0.1).requires_grad_()
    b = torch.randn(k, generator=g, requires_grad=True)
    y = fcnkern.conv2d_relu(x, w, b, stride=stride, padding=1, backend="cpu")
    return [y, *torch.autograd.grad(y, (x, w, b), torch.randn(y.shape, generator=g))]


def _upsample(g: torch.Generator) -> list[torch.Tensor]:
    x = torch.randn(2, 21, 5, 6, generator=g, requires_grad=True)
    w = torch.randn(21, 21, 4, 4, generator=g, requires_grad=True)
    y = fcnkern.upsample_crop(x, w, 2, (1, 1), (9, 10), backend="cpu")
    return [y, *torch.autograd.grad(y, (x, w), torch.randn(y.shape, generator=g))]


def _losses(g: torch.Generator) -> list[torch.Tensor]:
    x = torch.randn(3, 21, 40, 50, generator=g, requires_grad=True)
    t = torch.randint(0, 21, (3, 40, 50), generator=g)
    t[0, :3] = 255
    loss = fcnkern.pixelwise_cross_entropy(x, t, backend="cpu")
    scores = torch.randn(2, 21, 9, 9, generator=g, requires_grad=True)
    head = fcnkern.upsample_cross_entropy(scores, torch.randint(0, 21, (2, 60, 61), generator=g), 8, (5, 7),
                                          backend="cpu")  # fmt: skip
    return [loss, *torch.autograd.grad(loss, x), head, *torch.autograd.grad(head, scores)]


# Each a different kernel: blocked direct (32 -> 64), Winograd or im2col GEMMs (64 -> 64 and 128 -> 64 on larger
# maps), a strided conv, the learned upsampling's cell GEMMs, the cross-entropy and the fused head.
JOBS = [
    lambda g: _conv(g, 32, 64, 17, 1),
    lambda g: _conv(g, 64, 64, 40, 1),
    lambda g: _conv(g, 128, 64, 33, 2),
    _upsample,
    _losses,
]


def _run(worker: int, rounds: int, results: dict) -> None:
    for r in range(rounds):
        for j, job in enumerate(JOBS):
            results[(worker, r, j)] = [t.detach() for t in job(generator("threads", worker, r, j))]


def test_concurrent_calls_give_the_sequential_results():
    require_backend("cpu")
    workers, rounds = 4, 2
    alone: dict = {}
    for worker in range(workers):
        _run(worker, rounds, alone)
    together: dict = {}
    errors: list[BaseException] = []

    def body(worker: int) -> None:
        try:
            _run(worker, rounds, together)
        except BaseException as e:  # reported below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=body, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert together.keys() == alone.keys()
    differing = [key for key in alone if not all(map(torch.equal, alone[key], together[key]))]
    assert not differing, f"results that differ from the call alone (worker, round, job): {differing}"
