"""The ops are proper torch.library custom ops: opcheck passes, and torch.compile(fullgraph=True) traces the
public function without graph breaks, with the same values and gradients as eager."""

from __future__ import annotations

import pytest
import torch
from helpers import generator

import fcnkern
from fcnkern import pixelwise_cross_entropy

IGNORE = 255


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each case compiles the same nested function: start each from an empty cache (limit: 8 recompiles)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _inputs(dtype=torch.float32, shape=(2, 5, 3, 4)):
    g = generator("opcheck", dtype, shape)
    n, c, h, w = shape
    logits = torch.randn(shape, generator=g).to(dtype)
    target = torch.randint(0, c, (n, h, w), generator=g)
    target[0, 0, 0] = IGNORE
    weight = torch.rand(c, generator=g, dtype=torch.float64 if dtype == torch.float64 else torch.float32) + 0.5
    return logits, target, weight


def _ops(backend: str):
    info = fcnkern.backend_info(backend)
    if not info.available:
        pytest.skip(f"backend {backend!r} unavailable: {info.reason}")
    if backend == "triton":
        return torch.ops.fcnkern.triton_pixelwise_ce_fwd.default, torch.ops.fcnkern.triton_pixelwise_ce_bwd.default
    return torch.ops.fcnkern.pixelwise_ce_fwd.default, torch.ops.fcnkern.pixelwise_ce_bwd.default


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_opcheck(backend, dtype, weighted):
    fwd, bwd = _ops(backend)
    logits, target, weight = _inputs(dtype)
    w = weight if weighted else None
    torch.library.opcheck(fwd, (logits.requires_grad_(), target, w, IGNORE))
    loss, stats = fwd(logits.detach(), target, w, IGNORE)
    grad_loss = torch.randn_like(loss).expand(loss.shape)
    torch.library.opcheck(bwd, (grad_loss, logits.detach(), target, w, stats, IGNORE))
    prefix = "triton_" if backend == "triton" else ""
    fwd_grad = getattr(torch.ops.fcnkern, f"{prefix}pixelwise_ce_fwd_grad").default
    torch.library.opcheck(fwd_grad, (logits, target, w, IGNORE))
    _, grad = fwd_grad(logits.detach(), target, w, IGNORE)
    scale = torch.tensor([0.5], dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    torch.library.opcheck(getattr(torch.ops.fcnkern, f"{prefix}pixelwise_ce_scale_grad_").default, (grad, scale))


@pytest.mark.parametrize("backend", ["cpu", "triton", "torch"])
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_compile_fullgraph_matches_eager(backend, reduction):
    """aot_eager runs dynamo + AOTAutograd with the fake kernels and registered autograd, without codegen."""
    _ops(backend) if backend != "torch" else None
    logits, target, weight = _inputs()

    def step(x):
        return pixelwise_cross_entropy(x, target, weight, IGNORE, reduction, backend=backend)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x1, x2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    eager, traced = step(x1), compiled(x2)
    torch.testing.assert_close(traced, eager)
    eager.sum().backward()
    traced.sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad)


def test_compile_inductor_cpu_backend():
    """One end-to-end Inductor compile (the reductions around the op get generated C++)."""
    _ops("cpu")
    logits, target, weight = _inputs(shape=(2, 21, 9, 11))

    def step(x):
        return pixelwise_cross_entropy(x, target, weight, IGNORE, "mean", backend="cpu")

    compiled = torch.compile(step, fullgraph=True)
    x1, x2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    eager, traced = step(x1), compiled(x2)
    torch.testing.assert_close(traced, eager)
    eager.backward()
    traced.backward()
    torch.testing.assert_close(x2.grad, x1.grad)
