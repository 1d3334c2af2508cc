"""Fused FCN head: fixed bilinear upsampling + crop + pixelwise softmax cross-entropy in one kernel.

``upsample_cross_entropy(scores, target, factor, crop)`` equals
``pixelwise_cross_entropy(bilinear_upsample_crop(scores, factor, crop, target.shape[-2:]), target, ...)`` but never
forms the N x C x H x W full-resolution logits nor their gradient, the two largest tensors of an FCN training step
(21 x 500 x 500 floats each per image). Every full-resolution pixel's logits are built from its 2 x 2 low-resolution
taps as the loss needs them, and the gradient is reduced straight into the low-resolution scores (the maths and the
cell decomposition are in cpp/upsample_ce.h). What remains at full resolution is the N x H x W per-pixel loss (as
big as a fifth of the int64 target), which the ``none``/``mean`` reductions need and which makes ``sum``
deterministic.

Design, the same on every kernel backend: when a gradient will be needed and the reduction is ``sum`` or ``mean``,
the forward computes it in the same sweep, for an upstream gradient of 1. Unlike the plain loss, whose gradient is a
logits-sized write, here it is low-resolution (1/f^2 of the logits), so the second exp sweep a separate backward
would need costs far more than keeping the result; the backward scales it by the scalar upstream gradient on the
device (no host sync). ``reduction="none"`` has a per-pixel upstream gradient, so its backward recomputes the
softmax in a second kernel.

- ``cpu`` (cpp/upsample_ce_cpu.cpp): a task per cell; the cell's pixels go through the plain loss's L1 tiles.
- ``cuda`` (cpp/upsample_ce_cuda.cu): a block per cell, a thread per pixel; warp-shuffle trees for the partials.
- ``triton`` (kernels/upsample_ce.py): a program per slice of a cell, outer-product logit tiles.
- ``torch``: the unfused composition of the two ops' ``torch`` references.

Deterministic on every backend (fixed-order reductions, no atomics). Bad labels: as in
:func:`fcnkern.pixelwise_cross_entropy` (ValueError on CPU tensors; NaN loss on CUDA unless ``check_labels``).

Why there is no learned-upsampling variant: FCN's final layers are fixed bilinear (the reference trains them with a
zero learning rate), and a learned C x C full-mixing kernel builds every full-resolution logit from 4 C taps (4 C^2
multiply-adds per pixel instead of 4 C), so the upsampling's GEMMs, not the loss, set its time. Measured on the CPU
(FCN-32s's layer with a learned 21 x 21 x 64 x 64 weight, 1 x 500 x 500, fwd+bwd): fcnkern.upsample_crop 51.5 ms,
the plain loss on its output 4.3 ms; fusing could save at most that 8 % of the time (plus the logits' memory).
The learned layers FCN does train (the 2x ``upscore2``/``upscore_pool4``) work at 1/16..1/4 resolution.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fcnkern import _amp, _autograd, _ext
from fcnkern import backend as _backend
from fcnkern.conv_relu import _acc, _cdiv
from fcnkern.cross_entropy import Reduction, check_loss_options, reduce_pixel_loss, scale_by_cpu_scalar, validate_labels
from fcnkern.second_order import differentiable_grad
from fcnkern.upsample import _check_factor, _check_input, _check_window, _pair, bilinear_upsample_crop

__all__ = ["IMPLEMENTED", "upsample_cross_entropy"]

IMPLEMENTED = ("triton", "cuda", "cpu", "torch")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------------------------
# Triton backend
# ---------------------------------------------------------------------------------------------------------------


def _cells(target: Tensor, factor: int, top: int, left: int) -> tuple[int, int, int, int]:
    """(r0, q0, CR, CQ): the first cell row and column of the kept window and how many it touches."""
    out_h, out_w = target.shape[1:]
    r0, q0 = top // factor, left // factor
    return r0, q0, (top + out_h - 1) // factor - r0 + 1, (left + out_w - 1) // factor - q0 + 1


def _triton_run(
    scores: Tensor, target: Tensor, weight: Tensor | None, grad_loss: Tensor | None, factor: int, top: int,
    left: int, ignore_index: int, write_loss: bool, with_grad: bool,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    from fcnkern.kernels import upsample_ce as k

    n, c, h, w = scores.shape
    out_h, out_w = target.shape[1:]
    acc = _acc_dtype(scores.dtype)
    loss = _ext.maybe_poison(scores.new_empty((n, out_h, out_w) if write_loss else (0,), dtype=acc))
    r0, q0, cr, cq = _cells(target, factor, top, left)
    block_p, block_c = k.head_blocks(factor, c)
    slices = _cdiv(factor * factor, block_p)
    ws = scores.new_empty((4, n, c, cr, cq, slices) if with_grad else (0,), dtype=acc)
    # Slices past a cell's kept pixels write zeros (their lanes are masked), so no element of ws is left unset.
    ws = _ext.maybe_poison(ws)
    if n > 0:
        g = grad_loss if grad_loss is not None else loss
        k.head_kernel[(slices, cq, n * cr)](
            scores, target, weight if weight is not None else loss, g, loss, ws,
            n, c, h, w, out_h, out_w, factor, top, left, r0, q0, cr, cq, slices,
            *scores.stride(), *target.stride(), *(g.stride() if grad_loss is not None else (0, 0, 0)),
            ignore_index, weight is not None,
            WRITE_LOSS=write_loss, WITH_GRAD=with_grad,
            HAS_UPSTREAM=grad_loss is not None, ACC=_acc(scores.dtype), BLOCK_P=block_p, BLOCK_C=block_c,
            num_warps=k.HEAD_NUM_WARPS,
        )  # fmt: skip
    if not with_grad:
        return loss, ws
    grad = _ext.maybe_poison(scores.new_empty((n, c, h, w), dtype=acc))
    total = grad.numel()
    if total > 0:
        k.combine_kernel[(_cdiv(total, k.COMBINE_BLOCK),)](
            ws, grad, total, n * c, h, w, r0, q0, cr, cq, slices, BLOCK=k.COMBINE_BLOCK, num_warps=k.HEAD_NUM_WARPS
        )
    return loss, grad


@torch.library.custom_op("fcnkern::triton_upsample_ce_fwd", mutates_args=())
def _triton_fwd(
    scores: Tensor, target: Tensor, weight: Tensor | None, factor: int, top: int, left: int, ignore_index: int,
    with_grad: bool,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(per-pixel loss N x H x W, gradient of its sum w.r.t. scores N x C x h x w or empty), as the C++ op."""
    if scores.device.type == "cpu":  # interpreter: checking costs no sync here
        validate_labels(target, scores.shape[1], ignore_index)
    return _triton_run(scores, target, weight, None, factor, top, left, ignore_index, True, with_grad)


@torch.library.custom_op("fcnkern::triton_upsample_ce_bwd", mutates_args=())
def _triton_bwd(
    grad_loss: Tensor, scores: Tensor, target: Tensor, weight: Tensor | None, factor: int, top: int, left: int,
    ignore_index: int,
) -> Tensor:  # fmt: skip
    return _triton_run(scores, target, weight, grad_loss, factor, top, left, ignore_index, False, True)[1]


# ---------------------------------------------------------------------------------------------------------------
# Fake kernels and autograd, shared by the Triton and the C++/CUDA ops
# ---------------------------------------------------------------------------------------------------------------


def _fake_fwd(scores, target, weight, factor, top, left, ignore_index, with_grad):
    acc = _acc_dtype(scores.dtype)
    loss = scores.new_empty((scores.shape[0], *target.shape[1:]), dtype=acc)
    return loss, scores.new_empty(scores.shape if with_grad else (0,), dtype=acc)


def _fake_bwd(grad_loss, scores, target, weight, factor, top, left, ignore_index):
    return scores.new_empty(scores.shape, dtype=_acc_dtype(scores.dtype))


def _differentiable_grad(scores, target, weight, factor, top, left, ignore_index, grad_loss) -> Tensor:
    """The scores' gradient for upstream grad_loss (N x H x W) through PyTorch's upsampling + crop +
    F.cross_entropy, kept differentiable (second-order gradients: see fcnkern.second_order). Full-resolution
    logits exist here, in this rare path only."""

    def per_pixel(s: Tensor) -> Tensor:
        logits = bilinear_upsample_crop(s.to(_acc_dtype(s.dtype)), factor, (top, left), target.shape[-2:],
                                        backend="torch")  # fmt: skip
        return F.cross_entropy(logits, target, weight, ignore_index=ignore_index, reduction="none")

    return differentiable_grad(per_pixel, scores, grad_loss)


def _register(fwd_name: str, bwd_op, scale_op) -> None:
    """Autograd of forward op ``fwd_name``: ``bwd_op`` recomputes the scores' gradient for a per-pixel upstream
    gradient, ``scale_op`` scales a gradient in place by one upstream value (the cross-entropy's, whose rule is the
    same: zeros stay zero, nothing at all for 1)."""

    def setup_context(ctx, inputs, output):
        scores, target, weight, factor, top, left, ignore_index, _ = inputs
        ctx.args = (factor, top, left, ignore_index)
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)
        # Eagerly (fcnkern._autograd's Function) the forward's gradient is held on ctx, not saved, so that the first
        # backward can scale it in place and hand it on: no new tensor, and for loss.backward() no kernel but one
        # that reads the upstream 1 on the device and stops. Traced (torch.compile, opcheck), it is saved.
        if getattr(ctx, "eager", False):
            ctx.save_for_backward(scores, target, weight)
            ctx.held = output[1] if output[1].numel() > 0 else None
            ctx.with_grad = output[1].numel() > 0
        else:
            ctx.save_for_backward(scores, target, weight, output[1])

    def backward(ctx, grad_loss, _grad_grad):
        if grad_loss is None:
            return (None,) * 8
        scores, target, weight, *traced = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a gradient that autograd can differentiate again
            return (_differentiable_grad(scores, target, weight, *ctx.args, grad_loss),) + (None,) * 7
        scalar_upstream = grad_loss.numel() > 0 and all(step == 0 for step in grad_loss.stride())
        with_grad = traced[0].numel() > 0 if traced else ctx.with_grad
        if not with_grad or not scalar_upstream:  # a per-pixel upstream: the recomputing kernel
            grad = _autograd.backward_call(bwd_op, grad_loss, scores, target, weight, *ctx.args)
        elif traced:
            grad = scale_by_cpu_scalar(traced[0], grad_loss)
            if grad is None:
                # Where no kept pixel contributes (all ignored), the gradient is 0 even for an infinite upstream
                # value (a mean over no pixels), as in PyTorch.
                grad = torch.where(traced[0] == 0, 0.0, traced[0] * grad_loss[0, 0, 0])
        else:
            # The first backward takes the held gradient; a later one through the same graph (retain_graph=True)
            # recomputes it for an upstream 1, so that every backward scales the same values the same way.
            grad, ctx.held = ctx.held, None
            if grad is None:
                ones = grad_loss.new_ones(()).expand(grad_loss.shape)
                grad = _autograd.backward_call(bwd_op, ones, scores, target, weight, *ctx.args)
            scaled = scale_by_cpu_scalar(grad, grad_loss)
            if scaled is None:  # a device upstream value, or a CPU one that is not finite
                _autograd.kernel(scale_op, grad, grad_loss.as_strided((1,), (1,)))
                scaled = grad
            grad = scaled
        return (grad.to(scores.dtype),) + (None,) * 7

    _autograd.register_autograd(fwd_name, backward, setup_context)


def _register_cpp_ops() -> None:
    torch.library.register_fake("fcnkern::upsample_ce_fwd")(_fake_fwd)
    torch.library.register_fake("fcnkern::upsample_ce_bwd")(_fake_bwd)
    ops = torch.ops.fcnkern
    _register("fcnkern::upsample_ce_fwd", ops.upsample_ce_bwd, ops.pixelwise_ce_scale_grad_)


_triton_fwd.register_fake(_fake_fwd)
_triton_bwd.register_fake(_fake_bwd)
_register("fcnkern::triton_upsample_ce_fwd", _triton_bwd, torch.ops.fcnkern.triton_pixelwise_ce_scale_grad_)
_ext.on_load(_register_cpp_ops)


# ---------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------


def _validate(scores: Tensor, target: Tensor, factor: int, crop: tuple[int, int]) -> None:
    _check_input(scores, "scores")
    if not isinstance(target, Tensor) or target.dim() != 3:
        raise ValueError(f"target must be N x H x W, got {getattr(target, 'shape', type(target).__name__)}")
    if target.dtype != torch.int64:
        raise TypeError(f"target must hold int64 class indices, got {target.dtype}")
    if target.shape[0] != scores.shape[0]:
        raise ValueError(f"target has {target.shape[0]} images but scores have {scores.shape[0]}")
    if target.device != scores.device:
        raise ValueError(f"target is on {target.device} but scores are on {scores.device}")
    _check_factor(factor)
    h, w = scores.shape[2:]
    _check_window(((h + 1) * factor, (w + 1) * factor), crop, tuple(target.shape[1:]))


def upsample_cross_entropy(
    scores: Tensor,
    target: Tensor,
    factor: int,
    crop: Sequence[int],
    weight: Tensor | None = None,
    ignore_index: int = 255,
    reduction: Reduction = "sum",
    *,
    backend: str | None = None,
    check_labels: bool | None = None,
) -> Tensor:
    """Softmax cross-entropy of the bilinearly upsampled, cropped scores: the loss of FCN-32s's / FCN-8s's final
    layer, without full-resolution logits.

    Args:
        scores: N x C x h x w low-resolution class scores, float32/float16/bfloat16 (float64 for gradchecks), any
            strides.
        target: N x H x W int64 labels in [0, C) or ``ignore_index``; (H, W) is the kept window's size.
        factor: upsampling factor f (kernel 2f, stride f, the FCN bilinear filter).
        crop: (top, left) of the kept window in the full (h + 1) f x (w + 1) f upsampled output (19 for FCN-32s,
            31 for FCN-8s).
        weight, ignore_index, reduction, check_labels: as in :func:`fcnkern.pixelwise_cross_entropy`.
        backend: ``"triton"``, ``"cuda"``, ``"cpu"``, ``"torch"`` or None for the current choice.

    Returns:
        The loss in ``scores.dtype`` (float32 under ``torch.autocast``): a scalar for sum/mean, N x H x W for none.
        Computed in fp32 (logits are never rounded to ``scores.dtype``, unlike the unfused composition). Gradient
        with respect to ``scores``. An fp16 sum can exceed 65504 and be inf, as ``pixelwise_cross_entropy``'s and
        ``F.cross_entropy``'s do.
    """
    crop_t = _pair(tuple(crop), "crop")
    _validate(scores, target, factor, crop_t)
    num_classes = scores.shape[1]
    check_loss_options(weight, num_classes, scores.device, ignore_index, reduction)
    be = _backend.resolve(backend, scores.device.type, "upsample_cross_entropy", IMPLEMENTED)
    # The cpu kernel raises on bad labels itself and the interpreted Triton op checks them (no sync on a CPU
    # tensor); the torch reference is checked here on every device (PyTorch's CUDA kernel would hit a device-side
    # assert), and any backend when the caller asks.
    eager = not torch.compiler.is_compiling()
    own_check = check_labels is None and be == "torch"
    if eager and (check_labels or own_check):
        validate_labels(target, num_classes, ignore_index)
    if be == "torch" or 0 in target.shape[1:]:  # an empty window leaves no pixel for a kernel: PyTorch's result
        from fcnkern.cross_entropy import pixelwise_cross_entropy

        logits = bilinear_upsample_crop(scores, factor, crop_t, tuple(target.shape[1:]), backend="torch")
        return pixelwise_cross_entropy(logits, target, weight, ignore_index, reduction, backend="torch",
                                       check_labels=False)  # fmt: skip
    if weight is not None:
        weight = weight.to(dtype=_acc_dtype(scores.dtype)).contiguous()
    with_grad = reduction != "none" and scores.requires_grad and torch.is_grad_enabled()
    args = (scores, target, weight, factor, crop_t[0], crop_t[1], ignore_index, with_grad)
    if be == "triton":
        loss = _autograd.call("fcnkern::triton_upsample_ce_fwd", *args)[0]
    else:
        _ext.load()
        loss = _autograd.call("fcnkern::upsample_ce_fwd", *args)[0]
    return reduce_pixel_loss(loss, target, weight, ignore_index, reduction, _amp.loss_dtype(scores))
