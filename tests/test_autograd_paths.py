"""Every forward op has one autograd formula run two ways (fcnkern._autograd): the torch.library registration
(torch.compile, opcheck) and an eager torch.autograd.Function. Eager calls take the Function; both give the same
values and gradients, bit for bit, since they run the same kernels and the same backward."""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICE_BACKENDS, generator, skip_reason

import fcnkern
from fcnkern import _autograd

IGNORE = 255


def _cases(g: torch.Generator) -> dict:
    """Each public op on small random inputs: name -> (function of backend, inputs that get gradients)."""
    x = torch.randn(2, 3, 7, 5, generator=g)
    w = torch.randn(4, 3, 3, 3, generator=g)
    b = torch.randn(4, generator=g)
    scores = torch.randn(2, 5, 3, 4, generator=g)
    up_w = torch.randn(5, 5, 4, 4, generator=g)
    logits = torch.randn(2, 5, 6, 7, generator=g)
    target = torch.randint(0, 5, (2, 6, 7), generator=g)
    target[0, 1, 2] = IGNORE
    return {
        "conv2d_relu": (lambda be, x, w, b: fcnkern.conv2d_relu(x, w, b, padding=1, backend=be), (x, w, b)),
        "upsample_crop": (lambda be, s, w: fcnkern.upsample_crop(s, w, 2, (1, 1), (5, 7), backend=be), (scores, up_w)),
        "bilinear": (lambda be, s: fcnkern.bilinear_upsample_crop(s, 2, (1, 2), (6, 7), backend=be), (scores,)),
        "ce_sum": (lambda be, t: fcnkern.pixelwise_cross_entropy(t, target, backend=be), (logits,)),
        "ce_none": (lambda be, t: fcnkern.pixelwise_cross_entropy(t, target, reduction="none", backend=be), (logits,)),
        "head_sum": (lambda be, s: fcnkern.upsample_cross_entropy(s, target, 2, (1, 1), backend=be), (scores,)),
        "head_none": (
            lambda be, s: fcnkern.upsample_cross_entropy(s, target, 2, (1, 1), reduction="none", backend=be),
            (scores,),
        ),
    }


def _run(fn, backend: str, inputs: tuple[torch.Tensor, ...], g: torch.Generator):
    leaves = [t.clone().requires_grad_() for t in inputs]
    out = fn(backend, *leaves)
    out.backward(torch.randn(out.shape, generator=g))
    return out.detach(), [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("backend", [b for b in DEVICE_BACKENDS["cpu"] if b != "torch"])
@pytest.mark.parametrize("case", list(_cases(torch.Generator().manual_seed(0))))
def test_eager_function_equals_registration(case, backend, monkeypatch):
    reason = skip_reason("cpu", backend)
    if reason:
        pytest.skip(reason)
    fn, inputs = _cases(generator("paths", case))[case]
    seen: list[str] = []
    eager_call = _autograd.call

    def spy(name, *args):
        seen.append(name)
        return eager_call(name, *args)

    monkeypatch.setattr(_autograd, "call", spy)
    eager_out, eager_grads = _run(fn, backend, inputs, generator("paths-up", case))
    # The triton cross-entropy trains through its own Function (the gradient written in the forward, scaled on
    # the device: fcnkern.cross_entropy._GradInForward), whose gradient rounds in another order than the
    # registered recompute path's; everything else goes through fcnkern._autograd.call, bit for bit.
    grad_in_forward = case.startswith("ce_") and backend == "triton"
    assert grad_in_forward or seen, "the op did not go through fcnkern._autograd.call"
    assert all(name in _autograd._eager for name in seen)

    monkeypatch.setattr(_autograd, "call", lambda name, *args: _autograd._op(name)(*args))
    if grad_in_forward:  # the registered ops' path, as torch.compile traces it
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    reg_out, reg_grads = _run(fn, backend, inputs, generator("paths-up", case))
    assert torch.equal(eager_out, reg_out)
    for e, r in zip(eager_grads, reg_grads, strict=True):
        assert e is not None
        if grad_in_forward:
            torch.testing.assert_close(e, r, rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(e, r)


def test_eager_call_uses_the_function():
    """An eager call's autograd node is the Function's, not the registration's generated one."""
    reason = skip_reason("cpu", "triton")
    if reason:
        pytest.skip(reason)
    x = torch.randn(1, 3, 5, 5, requires_grad=True)
    w = torch.randn(2, 3, 3, 3, requires_grad=True)
    y = fcnkern.conv2d_relu(x, w, padding=1, backend="triton")
    assert type(y.grad_fn).__name__ == "fcnkern_triton_conv2d_relu_eagerBackward"


def _triton_or_skip() -> None:
    reason = skip_reason("cpu", "triton")
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("case", list(_cases(torch.Generator().manual_seed(0))))
def test_triton_kernels_called_directly(case, monkeypatch):
    """Eagerly, the Triton backend's custom ops run their Python functions without the dispatcher's round trip
    (fcnkern._autograd.kernel), forward and backward, with the same values and gradients bit for bit as through
    the ops."""
    _triton_or_skip()
    fn, inputs = _cases(generator("direct", case))[case]
    _run(fn, "triton", inputs, generator("direct-up", case))  # resolves every op this case calls
    calls: dict[str, int] = {}

    def counting(name, inner):
        def run(*args):
            calls[name] = calls.get(name, 0) + 1
            return inner(*args)

        return run

    for op, found in list(_autograd._python_kernels.items()):
        if found is not None:
            name = getattr(op, "_qualname", None) or op._name
            monkeypatch.setitem(_autograd._python_kernels, op, (counting(name, found[0]), found[1]))
    direct_out, direct_grads = _run(fn, "triton", inputs, generator("direct-up", case))
    assert any(not name.endswith(("_bwd", "_scale_grad_")) for name in calls), calls  # the forward
    # The backward too, except where it needs no kernel: the gradient written by the forward, scaled by torch ops
    # for a per-pixel upstream (ce_none) or on the host for a CPU scalar one (head_sum).
    if case not in ("ce_none", "head_sum"):
        assert any(name.endswith(("_bwd", "_scale_grad_")) for name in calls), calls

    monkeypatch.setattr(_autograd, "_python_kernel", lambda op: None)  # every kernel through its op
    op_out, op_grads = _run(fn, "triton", inputs, generator("direct-up", case))
    assert torch.equal(direct_out, op_out)
    for d, o in zip(direct_grads, op_grads, strict=True):
        assert torch.equal(d, o)


def test_cpp_ops_are_not_python_kernels():
    reason = skip_reason("cpu", "cpu")
    if reason:
        pytest.skip(reason)
    assert _autograd._python_kernel(torch.ops.fcnkern.conv2d_relu.default) is None
    assert _autograd._python_kernel(torch.ops.fcnkern.triton_conv2d_relu.default) is not None


def test_direct_kernel_bumps_the_version_of_what_it_mutates():
    """The in-place scaling op, called directly, still tells autograd that its tensor changed."""
    _triton_or_skip()
    op = torch.ops.fcnkern.triton_pixelwise_ce_scale_grad_.default
    found = _autograd._python_kernel(op)
    assert found is not None and found[1] == (0,)
    grad = torch.randn(2, 3, 4, 5, generator=generator("bump"))
    expected = grad * 0.5
    before = grad._version
    _autograd.kernel(op, grad, torch.tensor([0.5]))
    assert grad._version > before
    torch.testing.assert_close(grad, expected)


def test_dispatch_modes_and_the_profiler_see_the_op():
    """Where something other than the kernel may look at the call, the op itself is called: under FakeTensorMode
    its fake implementation runs (the Triton function on fake tensors would fail), and the autograd profiler
    records the op by name."""
    _triton_or_skip()
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.randn(1, 3, 6, 6, generator=generator("modes"))
    w = torch.randn(4, 3, 3, 3, generator=generator("modes-w"))
    with FakeTensorMode() as mode:
        y = fcnkern.conv2d_relu(mode.from_tensor(x), mode.from_tensor(w), padding=1, backend="triton")
    assert tuple(y.shape) == (1, 4, 6, 6)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fcnkern.conv2d_relu(x, w, padding=1, backend="triton")
    assert any("fcnkern::triton_conv2d_relu" in e.key for e in prof.key_averages())
