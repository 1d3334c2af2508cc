"""Parity of fcnkern.pixelwise_cross_entropy with F.cross_entropy, forward and backward, on every backend and
dtype, plus its edge cases and bad-input errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    FP32_TOL,
    assert_fp32_ok,
    assert_low_precision_ok,
    device_backend_params,
    generator,
    interpreted,
    rel_err,
    require_backend,
    split_examples,
)
from hypothesis import given
from hypothesis import strategies as st

import fcnkern
from fcnkern import BackendUnavailableError, pixelwise_cross_entropy

IGNORE = 255
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
REDUCTIONS = ["sum", "mean", "none"]
# C = 1, 2, 21 (VOC), 150 (ADE20K); H, W primes and 1; N up to 4.
SHAPES = [(1, 1, 1, 1), (2, 2, 7, 5), (1, 21, 13, 17), (4, 21, 3, 1), (1, 150, 5, 7), (3, 5, 1, 11), (2, 21, 31, 37)]


def make_inputs(shape, dtype, device, *key, ignore_frac=0.15, scale=3.0):
    g = generator(shape, dtype, *key)
    n, c, h, w = shape
    logits = (torch.randn(shape, generator=g) * scale).to(dtype)
    target = torch.randint(0, c, (n, h, w), generator=g)
    target[torch.rand((n, h, w), generator=g) < ignore_frac] = IGNORE
    weight = torch.rand(c, generator=g) + 0.5
    grad_none = torch.randn((n, h, w), generator=g)
    grad_scalar = torch.rand((), generator=g) + 0.5
    return [t.to(device) for t in (logits, target, weight, grad_none, grad_scalar)]


def loss_and_grad(fn, logits, upstream):
    x = logits.detach().clone().requires_grad_()
    loss = fn(x)
    (grad,) = torch.autograd.grad(loss, x, upstream.to(loss.dtype).expand_as(loss))
    return loss.detach(), grad


def check_against_reference(device, backend, dtype, logits, target, weight, reduction, upstream):
    """Compare loss and gradient with F.cross_entropy in float64 (and, in fp16/bf16, with PyTorch's own error)."""

    def ours(x):
        return pixelwise_cross_entropy(x, target, weight, IGNORE, reduction, backend=backend)

    def torch_way(x):
        w = None if weight is None else weight.to(x.dtype)
        return F.cross_entropy(x, target, w, ignore_index=IGNORE, reduction=reduction)

    loss, grad = loss_and_grad(ours, logits, upstream)
    assert loss.dtype == dtype and grad.dtype == dtype and grad.shape == logits.shape
    ref_loss, ref_grad = loss_and_grad(torch_way, logits.double(), upstream.double())
    t_loss, t_grad = loss_and_grad(torch_way, logits, upstream)
    if dtype == torch.float32:
        assert_fp32_ok(loss, t_loss, ref_loss, "loss")
        assert_fp32_ok(grad, t_grad, ref_grad, "grad")
    else:
        assert_low_precision_ok(loss, t_loss, ref_loss, dtype, "loss")
        assert_low_precision_ok(grad, t_grad, ref_grad, dtype, "grad")


@pytest.mark.parametrize(("device", "backend"), device_backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_parity(device, backend, dtype, reduction, weighted, shape):
    logits, target, weight, grad_none, grad_scalar = make_inputs(shape, dtype, device, reduction, weighted)
    upstream = grad_none if reduction == "none" else grad_scalar
    check_against_reference(device, backend, dtype, logits, target, weight if weighted else None, reduction, upstream)


def _layouts(logits: torch.Tensor):
    n, c, h, w = logits.shape
    yield "channels_last", logits.contiguous(memory_format=torch.channels_last)
    big = torch.randn(n, c, h + 5, w + 7, device=logits.device, dtype=logits.dtype)
    big[:, :, 2 : 2 + h, 3 : 3 + w] = logits
    yield "cropped_view", big[:, :, 2 : 2 + h, 3 : 3 + w]
    yield "transposed_hw", logits.transpose(2, 3).contiguous().transpose(2, 3)
    yield "class_strided", torch.stack([logits, logits], dim=2).flatten(1, 2)[:, ::2]


@pytest.mark.parametrize(("device", "backend"), device_backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_inputs(device, backend, dtype):
    logits, target, weight, grad_none, _ = make_inputs((2, 21, 11, 13), dtype, device, "layouts")
    for name, view in _layouts(logits):
        assert torch.equal(view, logits), name
        # Non-contiguous target too: every other row of a taller label map.
        tall = torch.full((2, 22, 13), IGNORE, dtype=torch.int64, device=device)
        tall[:, ::2] = target
        check_against_reference(device, backend, dtype, view, tall[:, ::2], weight, "none", grad_none)


@pytest.mark.parametrize(("device", "backend"), device_backend_params())
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_pixels_ignored(device, backend, reduction):
    logits, target, weight, *_ = make_inputs((2, 4, 3, 5), torch.float32, device, "ignored")
    target.fill_(IGNORE)
    x = logits.clone().requires_grad_()
    loss = pixelwise_cross_entropy(x, target, weight, IGNORE, reduction, backend=backend)
    ref = F.cross_entropy(logits, target, weight, ignore_index=IGNORE, reduction=reduction)
    if reduction == "mean":
        assert torch.isnan(loss) and torch.isnan(ref)  # 0/0, as in PyTorch
    else:
        assert torch.equal(loss, torch.zeros_like(loss)) and torch.equal(ref, torch.zeros_like(ref))
    # The upstream gradient of an empty mean is infinite; ignored pixels still get exactly 0, as in PyTorch.
    loss.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x.grad))


@pytest.mark.parametrize(("device", "backend"), device_backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_extreme_logits(device, backend, dtype):
    """Logits of +-1e4: the loss is finite and exact where the max class is the target, huge where it is not."""
    logits, target, _, grad_none, _ = make_inputs((2, 21, 5, 7), torch.float32, device, "extreme")
    logits = torch.where(logits > 0, 1e4, -1e4).to(dtype)
    x = logits.clone().requires_grad_()
    loss = pixelwise_cross_entropy(x, target, reduction="none", backend=backend)
    loss.backward(grad_none.to(dtype))
    assert torch.isfinite(loss).all() and torch.isfinite(x.grad).all()
    check_against_reference(device, backend, dtype, logits, target, None, "none", grad_none)


@pytest.mark.parametrize(("device", "backend"), device_backend_params())
def test_deterministic(device, backend):
    logits, target, weight, _, _ = make_inputs((3, 21, 17, 19), torch.float32, device, "det")

    def run():
        return loss_and_grad(
            lambda x: pixelwise_cross_entropy(x, target, weight, backend=backend), logits, torch.ones(())
        )

    results = [run(), run()]
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize(("device", "backend"), device_backend_params())
@pytest.mark.parametrize("bad", [21, -1, 254, 256])
def test_out_of_range_label_raises_on_cpu(device, backend, bad):
    logits, target, *_ = make_inputs((1, 21, 4, 6), torch.float32, device, "bad")
    target[0, 2, 3] = bad
    if device == "cpu":
        with pytest.raises(ValueError, match=rf"label {bad}, outside \[0, 21\)"):
            pixelwise_cross_entropy(logits, target, backend=backend)
    elif backend == "torch":  # PyTorch's CUDA kernel would hit a device-side assert: the reference checks first
        with pytest.raises(ValueError, match=rf"label {bad}"):
            pixelwise_cross_entropy(logits, target, backend=backend)
    else:  # CUDA kernels: no sync by default; the loss is NaN (never silently finite), and check_labels=True raises.
        assert torch.isnan(pixelwise_cross_entropy(logits, target, backend=backend))
        with pytest.raises(ValueError, match=rf"label {bad}"):
            pixelwise_cross_entropy(logits, target, backend=backend, check_labels=True)


@pytest.mark.parametrize(("device", "backend"), device_backend_params())
@pytest.mark.parametrize("upstream", [1.0, 0.25, "per-pixel"])
def test_gradient_scaling_and_second_backward(device, backend, upstream):
    """The cpu backend computes the gradient for an upstream 1 in the forward and scales it in the backward: every
    upstream value must land, and a second backward through the same graph must add the same gradient again."""
    logits, target, weight, grad_none, _ = make_inputs((2, 7, 5, 6), torch.float32, device, "scale", str(upstream))
    reduction = "none" if upstream == "per-pixel" else "sum"
    up = grad_none if upstream == "per-pixel" else torch.tensor(upstream, device=device)
    x = logits.clone().requires_grad_()
    loss = pixelwise_cross_entropy(x, target, weight, reduction=reduction, backend=backend)
    xr = logits.double().requires_grad_()
    F.cross_entropy(xr, target, weight.double(), ignore_index=IGNORE, reduction=reduction).backward(up.double())
    loss.backward(up, retain_graph=True)
    assert rel_err(x.grad, xr.grad) <= FP32_TOL
    first = x.grad.clone()
    loss.backward(up)
    assert rel_err(x.grad, 2 * first) <= FP32_TOL


@pytest.mark.parametrize(("device", "backend"), device_backend_params())
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_backwards_with_different_upstream_values(device, backend, reduction):
    """The cuda and triton backends hand the forward's gradient on, scaled in place, in the first backward of a
    summed or averaged loss: a later backward through the same graph, with another upstream value, must still be
    right (it recomputes)."""
    logits, target, weight, _, _ = make_inputs((2, 7, 5, 6), torch.float32, device, "rescale", reduction)
    x = logits.clone().requires_grad_()
    loss = pixelwise_cross_entropy(x, target, weight, reduction=reduction, backend=backend)
    xr = logits.double().requires_grad_()
    ref = F.cross_entropy(xr, target, weight.double(), ignore_index=IGNORE, reduction=reduction)
    for up in (1.0, 0.25, 3.0):
        (grad,) = torch.autograd.grad(loss, x, torch.tensor(up, device=device), retain_graph=True)
        (want,) = torch.autograd.grad(ref, xr, torch.tensor(up, device=device, dtype=torch.float64), retain_graph=True)
        assert rel_err(grad, want) <= FP32_TOL, up


def _scale_grad_ops():
    ops = [pytest.param(torch.ops.fcnkern.triton_pixelwise_ce_scale_grad_.default, id="triton")]
    if fcnkern.backend_info("cpu").available:
        ops.append(pytest.param("cpp", id="cpp"))
    return ops


@pytest.mark.parametrize("op", _scale_grad_ops())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_scale_grad_in_place(op, dtype):
    """grad *= scale in place, zeros (ignored pixels) kept exactly zero even for an infinite scale, NaN (a bad
    label) kept NaN, and grad left bit for bit as it was for a scale of 1."""
    if op == "cpp":
        op = torch.ops.fcnkern.pixelwise_ce_scale_grad_.default
    if "triton" in str(op) and not fcnkern.backend_info("triton").available:
        pytest.skip("backend 'triton' unavailable")
    g = generator("scale-op", dtype)
    base = torch.randn(2, 3, 5, 7, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    base[0, :, 1, 2] = 0
    base[1, 2, 3, 4] = float("nan")
    for value in (1.0, 0.375, float("inf")):
        grad = base.clone()
        op(grad, torch.tensor([value]))
        want = torch.where(base != 0, (base.float() * value).to(dtype), torch.zeros_like(base))
        # bf16: one rounding step apart at most (the CPU interpreter's fp32 -> bf16 conversion truncates)
        rtol = 2**-7 if dtype == torch.bfloat16 else 0.0
        torch.testing.assert_close(grad, want if value != 1.0 else base, rtol=rtol, atol=0, equal_nan=True)
        if value == 1.0:
            assert torch.equal(grad.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                               base.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))  # fmt: skip
    with pytest.raises(ValueError, match="scale must be one"):
        op(base.clone(), torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="dense"):
        op(base.clone()[:, :, ::2], torch.tensor([2.0]))


@pytest.mark.parametrize("backend", ["cpu", "triton", "torch"])
def test_custom_ignore_index_and_negative_ignore(backend):
    require_backend(backend)
    logits, target, *_ = make_inputs((2, 5, 4, 6), torch.float32, "cpu", "ignore")
    target[target == IGNORE] = -100
    loss = pixelwise_cross_entropy(logits, target, ignore_index=-100, reduction="mean", backend=backend)
    ref = F.cross_entropy(logits, target, ignore_index=-100, reduction="mean")
    assert torch.allclose(loss, ref, rtol=1e-5), backend


@pytest.mark.parametrize(
    ("make", "exc", "match"),
    [
        (lambda x, t: (x[0], t), ValueError, "N x C x H x W"),
        (lambda x, t: (x, t.float()), TypeError, "int64"),
        (lambda x, t: (x, t.int()), TypeError, "int64"),
        (lambda x, t: (x.long(), t), TypeError, "float32"),
        (lambda x, t: (x, t[:, :-1]), ValueError, "does not match"),
        (lambda x, t: (x[:, :0], t), ValueError, "C = 0"),
        (lambda x, t: (x, t.to("meta")), ValueError, "target is on meta"),
    ],
    ids=["rank", "float_target", "int32_target", "int_logits", "shape", "no_classes", "device"],
)
def test_bad_input_raises(make, exc, match):
    logits, target, *_ = make_inputs((2, 3, 4, 5), torch.float32, "cpu", "badinput")
    x, t = make(logits, target)
    with pytest.raises(exc, match=match):
        pixelwise_cross_entropy(x, t)


def test_bad_arguments_raise():
    logits, target, weight, *_ = make_inputs((2, 3, 4, 5), torch.float32, "cpu", "badargs")
    with pytest.raises(ValueError, match="3 class weights"):
        pixelwise_cross_entropy(logits, target, weight[:2])
    with pytest.raises(ValueError, match="weight is not supported"):
        pixelwise_cross_entropy(logits, target, weight.requires_grad_())
    with pytest.raises(ValueError, match="reduction"):
        pixelwise_cross_entropy(logits, target, reduction="avg")
    for backend in ("torch", "cpu"):  # the torch backend raised OverflowError from its label check, cpu the schema's
        with pytest.raises(ValueError, match="fit in int64"):
            pixelwise_cross_entropy(logits, target, ignore_index=2**70, backend=backend)
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        pixelwise_cross_entropy(logits, target, ignore_index=True)
    with pytest.raises(ValueError, match="unknown backend"):
        pixelwise_cross_entropy(logits, target, backend="cudnn")
    with pytest.raises(BackendUnavailableError, match="cuda backend runs on CUDA tensors"):
        pixelwise_cross_entropy(logits, target, backend="cuda")


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_float64(backend, reduction):
    require_backend(backend)
    logits, target, weight, *_ = make_inputs((2, 4, 3, 5), torch.float64, "cpu", "gradcheck", reduction)
    x = logits.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: pixelwise_cross_entropy(x, target, weight, reduction=reduction, backend=backend),
        (x,),
        fast_mode=interpreted(backend),
    )


def test_module_matches_function_and_keeps_weight_in_state_dict():
    logits, target, weight, *_ = make_inputs((2, 6, 5, 4), torch.float32, "cpu", "module")
    module = fcnkern.nn.PixelwiseCrossEntropy(weight=weight, reduction="mean")
    assert torch.equal(module.state_dict()["weight"], weight)
    assert torch.equal(module(logits, target), pixelwise_cross_entropy(logits, target, weight, reduction="mean"))
    assert "reduction='mean'" in repr(module)


@pytest.mark.parametrize("backend", ["cpu", "triton", "torch"])
@split_examples(3)
@given(
    n=st.integers(1, 3),
    c=st.integers(1, 40),
    h=st.integers(1, 19),
    w=st.integers(1, 19),
    reduction=st.sampled_from(REDUCTIONS),
    weighted=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_random_shapes(n, c, h, w, reduction, weighted, backend, seed):
    require_backend(backend)
    logits, target, weight, grad_none, grad_scalar = make_inputs((n, c, h, w), torch.float32, "cpu", seed)
    upstream = grad_none if reduction == "none" else grad_scalar
    check_against_reference(
        "cpu", backend, torch.float32, logits, target, weight if weighted else None, reduction, upstream
    )


def test_triton_row_tiles_follow_the_memory_layout():
    """The Triton kernels tile one row of pixels at a time: a contiguous image is one row of H*W pixels, a cropped
    view keeps its own rows (its rows are not back to back), and both give F.cross_entropy's values."""
    from fcnkern.cross_entropy import _pixel_rows

    full = torch.randn(2, 5, 7, 11)
    target = torch.randint(0, 5, (2, 7, 11))
    assert _pixel_rows(7, 11, full, target) == (1, 77)
    crop, crop_target = full[:, :, 1:6, 2:9], target[:, 1:6, 2:9]
    assert _pixel_rows(5, 7, crop, crop_target) == (5, 7)
    for x, t in ((full, target), (crop, crop_target)):
        got = fcnkern.pixelwise_cross_entropy(x, t, reduction="none", backend="triton")
        torch.testing.assert_close(got, F.cross_entropy(x, t, reduction="none"), rtol=1e-5, atol=1e-5)
