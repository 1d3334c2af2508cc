"""The fused FCN head (bilinear upsampling + crop + softmax cross-entropy) against conv_transpose2d + slicing +
F.cross_entropy and against the unfused fcnkern ops: forward and backward, every backend and dtype, FCN geometries
and odd ones, ignored pixels, class weights, every reduction; gradcheck, determinism, opcheck, torch.compile, bad
input, the module, and the models' loss path."""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    LOW_PRECISION,
    assert_fp32_ok,
    assert_low_precision_ok,
    device_backend_params,
    draw_window,
    fcn_and_twin,
    generator,
    interpreted,
    rel_err,
    require_backend,
    split_examples,
)
from hypothesis import given
from hypothesis import strategies as st

import fcnkern
from fcnkern import bilinear_weight, upsample_ce, upsample_cross_entropy

IGNORE = 255


class Case(NamedTuple):
    c: int  # classes
    f: int  # factor
    h: int  # scores' size
    w: int
    crop: tuple[int, int]
    size: tuple[int, int]  # the kept window's (the target's) size
    n: int  # images


# FCN geometries (reduced where the interpreter would take long) and odd ones.
CASES = [
    Case(21, 32, 3, 3, (19, 19), (97, 89), 1),  # FCN-32s's upscore + crop 19, several 32 x 32 cells
    Case(21, 8, 5, 6, (31, 31), (13, 17), 2),  # FCN-8s's upscore8 + crop 31
    Case(5, 4, 4, 3, (0, 0), (17, 13), 2),  # crop 0, prime sizes, the window reaching the last row of cells
    Case(1, 2, 3, 4, (1, 2), (7, 8), 1),  # one class
    Case(150, 2, 3, 2, (1, 1), (5, 3), 1),  # ADE20K's class count
    Case(7, 16, 2, 2, (9, 5), (31, 23), 1),
    Case(4, 3, 4, 4, (2, 1), (11, 13), 3),  # a factor whose cells are not a power of two
]


def _params():
    return device_backend_params("upsample_cross_entropy", upsample_ce.IMPLEMENTED, issue=8)


def _case_id(k: Case) -> str:
    return f"c{k.c}f{k.f}in{k.h}x{k.w}crop{k.crop[0]}-{k.crop[1]}out{k.size[0]}x{k.size[1]}n{k.n}"


def _inputs(case: Case, key, device="cpu", dtype=torch.float32, layout="nchw"):
    c, h, w, size, n = case.c, case.h, case.w, case.size, case.n
    g = generator("head", case, key)
    scores = (3 * torch.randn(n, c, h, w, generator=g)).to(device, dtype)
    if layout == "channels_last":
        scores = scores.contiguous(memory_format=torch.channels_last)
    elif layout == "cropped_view":
        big = torch.randn(n, c + 2, h + 3, w + 1, generator=g).to(device, dtype)
        big[:, 1 : 1 + c, 2 : 2 + h, :w] = scores
        scores = big[:, 1 : 1 + c, 2 : 2 + h, :w]
    target = torch.randint(0, c, (n, *size), generator=g)
    target[torch.rand(target.shape, generator=g) < 0.1] = IGNORE
    if layout == "cropped_view":  # a strided target too
        wide = torch.full((n, size[0], 2 * size[1]), IGNORE, dtype=torch.long)
        wide[:, :, ::2] = target
        target = wide[:, :, ::2]
    weight = torch.rand(c, generator=g) + 0.5
    return scores, target.to(device), weight.to(device)


def _reference(scores, target, factor, crop, weight, reduction):
    """pytorch-fcn's way: the full ConvTranspose2d with the diagonal bilinear weight, slicing, F.cross_entropy."""
    c = scores.shape[1]
    full = F.conv_transpose2d(scores, bilinear_weight(c, 2 * factor, scores.dtype).to(scores.device), stride=factor)
    logits = full[:, :, crop[0] : crop[0] + target.shape[1], crop[1] : crop[1] + target.shape[2]]
    w = None if weight is None else weight.to(scores.dtype)
    return F.cross_entropy(logits, target, w, ignore_index=IGNORE, reduction=reduction)


def _loss_and_grad(fn, scores, upstream):
    scores = scores.detach().clone().requires_grad_()
    loss = fn(scores)
    (grad,) = torch.autograd.grad(loss, scores, upstream.to(loss.dtype))
    return loss.detach(), grad


def _check(device, backend, dtype, case: Case, reduction, use_weight, layout="nchw"):
    f, crop, size, n = case.f, case.crop, case.size, case.n
    scores, target, weight = _inputs(case, (dtype, reduction, use_weight, layout), device, dtype, layout)
    weight = weight if use_weight else None
    g = generator("upstream", case, reduction)
    upstream = torch.randn(n, *size, generator=g) if reduction == "none" else torch.tensor(1.3)
    upstream = upstream.to(device)

    ours = _loss_and_grad(
        lambda s: upsample_cross_entropy(s, target, f, crop, weight, IGNORE, reduction, backend=backend),
        scores, upstream,
    )  # fmt: skip
    torch_way = _loss_and_grad(lambda s: _reference(s, target, f, crop, weight, reduction), scores, upstream)
    ref = _loss_and_grad(lambda s: _reference(s, target, f, crop, weight, reduction), scores.double(),
                         upstream.double())  # fmt: skip
    assert ours[0].dtype == dtype and ours[1].dtype == dtype and ours[1].shape == scores.shape
    for what, got, theirs, want in zip(("loss", "grad"), ours, torch_way, ref, strict=True):
        if dtype == torch.float32:
            assert_fp32_ok(got, theirs, want, what)
        else:
            assert_low_precision_ok(got, theirs, want, dtype, what)


@pytest.mark.parametrize(("device", "backend"), _params())
@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION], ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_conv_transpose_slice_cross_entropy(device, backend, dtype, case):
    """The summed loss (the paper's) and its gradient with respect to the scores, with ignored pixels: fp32 tight,
    fp16/bf16 no worse than twice PyTorch's own error in that dtype, both judged against float64."""
    _check(device, backend, dtype, case, "sum", use_weight=False)


@pytest.mark.parametrize(("device", "backend"), _params())
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("use_weight", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[6]], ids=_case_id)
def test_reductions_and_class_weights(device, backend, reduction, use_weight, case):
    """mean (weighted like PyTorch) and none (a per-pixel upstream gradient: the recomputing backward)."""
    _check(device, backend, torch.float32, case, reduction, use_weight)
    if reduction == "mean":
        _check(device, backend, torch.bfloat16, case, reduction, use_weight)


@pytest.mark.parametrize(("device", "backend"), _params())
@pytest.mark.parametrize("layout", ["channels_last", "cropped_view"])
def test_layouts(device, backend, layout):
    """channels_last scores; a non-contiguous window of a larger tensor with a strided target."""
    _check(device, backend, torch.float32, CASES[1], "sum", use_weight=True, layout=layout)
    _check(device, backend, torch.float32, CASES[6], "none", use_weight=False, layout=layout)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@split_examples(2)
@given(
    data=st.data(),
    c=st.integers(1, 6),
    factor=st.integers(1, 9),
    h=st.integers(1, 4),
    w=st.integers(1, 4),
    n=st.integers(1, 2),
    reduction=st.sampled_from(["sum", "mean", "none"]),
    use_weight=st.booleans(),
)
def test_property_random_geometries(data, c, factor, h, w, n, reduction, use_weight, backend):
    """Random factors, crops and windows anywhere in the full (h + 1) f x (w + 1) f output (cells cut at any
    offset), with ignored pixels and every reduction, against conv_transpose2d + slicing + F.cross_entropy."""
    require_backend(backend)
    crop, size = draw_window(data, ((h + 1) * factor, (w + 1) * factor))
    _check("cpu", backend, torch.float32, Case(c, factor, h, w, crop, size, n), reduction, use_weight)


@pytest.mark.parametrize(("device", "backend"), _params())
def test_equals_unfused_fcnkern_ops(device, backend):
    """Same loss and gradient as bilinear_upsample_crop followed by pixelwise_cross_entropy on the same backend."""
    case = CASES[1]
    f, crop, size = case.f, case.crop, case.size
    scores, target, weight = _inputs(case, "unfused", device)

    def unfused(s):
        up = fcnkern.bilinear_upsample_crop(s, f, crop, size, backend=backend)
        return fcnkern.pixelwise_cross_entropy(up, target, weight, IGNORE, "mean", backend=backend)

    fused = _loss_and_grad(
        lambda s: upsample_cross_entropy(s, target, f, crop, weight, IGNORE, "mean", backend=backend),
        scores, torch.tensor(1.0, device=device),
    )  # fmt: skip
    separate = _loss_and_grad(unfused, scores, torch.tensor(1.0, device=device))
    for got, want in zip(fused, separate, strict=True):
        torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize(("device", "backend"), _params())
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_gradcheck_float64(device, backend, reduction):
    g = generator("gc-head", reduction)
    scores = torch.randn(2, 3, 3, 2, generator=g, dtype=torch.float64).to(device).requires_grad_()
    target = torch.randint(0, 3, (2, 6, 5), generator=g)
    target[0, 1, :3] = IGNORE
    target = target.to(device)
    weight = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64, device=device)

    def fn(s):
        return upsample_cross_entropy(s, target, 2, (1, 1), weight, IGNORE, reduction, backend=backend)

    assert torch.autograd.gradcheck(fn, (scores,), fast_mode=interpreted(backend, device))


@pytest.mark.parametrize(("device", "backend"), _params())
def test_deterministic(device, backend):
    """Bitwise the same loss and gradient run to run (fixed-order reductions, no atomics)."""
    case = CASES[0]
    f, crop = case.f, case.crop
    scores, target, _ = _inputs(case, "determinism", device)
    one = torch.tensor(1.0, device=device)
    runs = [_loss_and_grad(lambda s: upsample_cross_entropy(s, target, f, crop, backend=backend), scores, one)
            for _ in range(2)]  # fmt: skip
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize(("device", "backend"), _params())
def test_all_pixels_ignored(device, backend):
    """As F.cross_entropy: sum 0, mean NaN, and a zero gradient either way."""
    scores = torch.randn(1, 4, 3, 3, device=device, requires_grad=True)
    target = torch.full((1, 9, 10), IGNORE, device=device)
    for reduction, expected in (("sum", 0.0), ("mean", float("nan"))):
        loss = upsample_cross_entropy(scores, target, 4, (2, 3), reduction=reduction, backend=backend)
        torch.testing.assert_close(loss, torch.tensor(expected, device=device), equal_nan=True)
        (grad,) = torch.autograd.grad(loss, scores)
        assert torch.equal(grad, torch.zeros_like(grad))


# The kernel backends' rule; the pure-PyTorch reference scales inside autograd (rounding differs, and 0 * inf is NaN).
@pytest.mark.parametrize(("device", "backend"), [p for p in _params() if "torch" not in str(p.values)])
@pytest.mark.parametrize("upstream", [1.0, 3.7, float("inf")])
def test_repeated_backward_through_one_graph(device, backend, upstream):
    """The eager path hands the forward's gradient on, scaled in place, in the first backward, and recomputes it in
    later ones (retain_graph=True): every backward gives the same gradient bit for bit, .grad accumulates them
    without aliasing, and an infinite upstream (as a mean over no pixels sends) scales the contributing entries
    and leaves the others exactly 0."""
    case = CASES[0]
    scores, target, _ = _inputs(case, "repeat", device)
    scores.requires_grad_()
    loss = upsample_cross_entropy(scores, target, case.f, case.crop, backend=backend) * upstream
    first = torch.autograd.grad(loss, scores, retain_graph=True)[0].clone()
    second = torch.autograd.grad(loss, scores, retain_graph=True)[0]
    assert torch.equal(first, second)
    loss.backward(retain_graph=True)
    loss.backward()
    torch.testing.assert_close(scores.grad, 2 * first, rtol=0, atol=0, equal_nan=True)
    ref = torch.autograd.grad(upsample_cross_entropy(scores, target, case.f, case.crop, backend=backend), scores)[0]
    expected = torch.where(ref == 0, 0.0, ref * upstream)
    torch.testing.assert_close(first, expected, rtol=1e-6, atol=0, equal_nan=True)


@pytest.mark.parametrize(("device", "backend"), _params())
def test_out_of_range_label(device, backend):
    scores = torch.randn(1, 4, 3, 3, device=device)
    target = torch.zeros(1, 9, 10, dtype=torch.long, device=device)
    target[0, 4, 4] = 4
    if device == "cpu" or backend == "torch":  # on CUDA, PyTorch's own kernel would hit a device-side assert
        with pytest.raises(ValueError, match="label 4"):
            upsample_cross_entropy(scores, target, 4, (2, 3), backend=backend)
    else:  # no sync by default: the loss is NaN, never silently wrong; check_labels=True raises
        assert torch.isnan(upsample_cross_entropy(scores, target, 4, (2, 3), backend=backend))
        with pytest.raises(ValueError, match="label 4"):
            upsample_cross_entropy(scores, target, 4, (2, 3), backend=backend, check_labels=True)


def test_bad_input_raises():
    scores, target = torch.randn(2, 4, 3, 3), torch.zeros(2, 9, 10, dtype=torch.long)
    with pytest.raises(ValueError, match="outside the upsampled output"):
        upsample_cross_entropy(scores, target, 4, (8, 0))  # the full output is 16 rows
    with pytest.raises(ValueError, match=">= 0"):
        upsample_cross_entropy(scores, target, 4, (-1, 0))
    with pytest.raises(ValueError, match="factor"):
        upsample_cross_entropy(scores, target, 0, (0, 0))
    with pytest.raises(TypeError, match="int64"):
        upsample_cross_entropy(scores, target.float(), 4, (0, 0))
    with pytest.raises(ValueError, match="images"):
        upsample_cross_entropy(scores, target[:1], 4, (0, 0))
    with pytest.raises(ValueError, match="N x H x W"):
        upsample_cross_entropy(scores, target[0], 4, (0, 0))
    with pytest.raises(ValueError, match="class weights"):
        upsample_cross_entropy(scores, target, 4, (0, 0), weight=torch.ones(3))
    with pytest.raises(ValueError, match="reduction"):
        upsample_cross_entropy(scores, target, 4, (0, 0), reduction="max")
    with pytest.raises(TypeError, match="float32"):
        upsample_cross_entropy(scores.long(), target, 4, (0, 0))
    with pytest.raises(ValueError, match="N x C x h x w"):
        upsample_cross_entropy(scores[0], target, 4, (0, 0))
    with pytest.raises(ValueError, match="scores has no channels"):
        upsample_cross_entropy(scores[:, :0], target, 4, (0, 0), backend="torch")
    with pytest.raises(fcnkern.BackendUnavailableError, match="backend 'cuda'"):
        upsample_cross_entropy(scores, target, 4, (0, 0), backend="cuda")
    if fcnkern.backend_info("cpu").available:  # the C++ op checks its own arguments too
        with pytest.raises(ValueError, match="outside the upsampled output"):
            torch.ops.fcnkern.upsample_ce_fwd(scores, target, None, 4, 8, 0, IGNORE, False)


def test_op_registration():
    """opcheck (schema, fake kernel, autograd registration) of the C++ and Triton ops, forward with and without the
    precomputed gradient and the recomputing backward, and a fullgraph torch.compile through each."""
    g = generator("opcheck-head")
    scores = torch.randn(2, 3, 3, 4, generator=g, requires_grad=True)
    target = torch.randint(0, 3, (2, 9, 11), generator=g)
    weight = torch.rand(3, generator=g) + 0.5
    grad_loss = torch.randn(2, 9, 11, generator=g)
    ops = []
    if fcnkern.backend_info("cpu").available:
        ops.append(("cpu", torch.ops.fcnkern.upsample_ce_fwd, torch.ops.fcnkern.upsample_ce_bwd))
    if fcnkern.backend_info("triton").available and fcnkern.backend.triton_interpreter():
        ops.append(("triton", torch.ops.fcnkern.triton_upsample_ce_fwd, torch.ops.fcnkern.triton_upsample_ce_bwd))
    if not ops:
        pytest.skip("neither the cpu nor the (interpreted) triton backend is available here")
    for backend, fwd, bwd in ops:
        for with_grad in (False, True):
            torch.library.opcheck(fwd.default, (scores, target, weight, 3, 2, 1, IGNORE, with_grad))
        torch.library.opcheck(bwd.default, (grad_loss, scores.detach(), target, None, 3, 2, 1, IGNORE))
        torch._dynamo.reset()

        def head(s, be=backend):
            return upsample_cross_entropy(s, target, 3, (2, 1), weight, IGNORE, "mean", backend=be)

        step = torch.compile(head, fullgraph=True, backend="aot_eager")
        loss = step(scores)
        (grad,) = torch.autograd.grad(loss, scores)
        want = _loss_and_grad(lambda s: _reference(s, target, 3, (2, 1), weight, "mean"), scores,
                              torch.tensor(1.0))  # fmt: skip
        torch.testing.assert_close((loss, grad), want, rtol=1e-5, atol=1e-6)


def test_module_form():
    case = CASES[1]
    f, crop = case.f, case.crop
    scores, target, weight = _inputs(case, "module")
    module = fcnkern.nn.UpsampleCrossEntropy(f, crop, weight, reduction="mean")
    assert "factor=8" in repr(module) and set(module.state_dict()) == {"weight"}
    torch.testing.assert_close(module(scores, target), upsample_cross_entropy(scores, target, f, crop, weight,
                                                                              reduction="mean"))  # fmt: skip


# The Triton interpreter would need many minutes for a VGG16 at padding 100; the op tests above cover its head.
CPU_MODEL_BACKENDS = [p for p in device_backend_params() if p.values[0] == "cpu" and p.values[1] != "triton"]


@pytest.mark.parametrize(("device", "backend"), CPU_MODEL_BACKENDS)
@pytest.mark.parametrize("variant", ["fcn32s", "fcn8s"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_model_loss_uses_the_fused_head_and_matches_twin(device, backend, variant, reduction):
    """model(x, target) on the fcnkern network runs the fused head; the twin's is F.cross_entropy of its output.
    Same weights: the same loss and parameter gradients."""
    model, twin = fcn_and_twin(variant, backend, ("head-weights", variant))
    assert model.head_backend == backend and twin.head_backend is None
    g = generator("head-input", variant)
    x = torch.randn(2, 3, 37, 29, generator=g)
    target = torch.randint(0, 21, (2, 37, 29), generator=g)
    target[:, :3] = IGNORE
    losses, grads = [], []
    for net in (model, twin):
        net.zero_grad(set_to_none=True)
        loss = net.loss(x, target, reduction=reduction)
        loss.backward()
        losses.append(loss.detach())
        grads.append({k: p.grad for k, p in net.named_parameters()})
    assert rel_err(losses[0], losses[1]) < 1e-5
    for name, grad in grads[1].items():
        assert rel_err(grads[0][name], grad) < 1e-4, name
    with pytest.raises(ValueError, match="target"):
        model(x, target[:, :5])
