"""Fused pixelwise softmax cross-entropy over NCHW logits (the FCN training loss).

``pixelwise_cross_entropy(logits, target)`` equals ``F.cross_entropy(logits, target, weight, ignore_index=255,
reduction="sum")`` in meaning, without materialising an N x C x H x W log-probability tensor.

Design, chosen per device by measurement (bench/test_bench_cross_entropy.py, numbers in the README):

- CUDA (``cuda``, ``triton``): the forward reads the logits once (online max and sum over classes, fp32
  accumulation) and writes the weighted per-pixel loss. Without a gradient (inference, or under torch.compile) it
  also writes the softmax statistics ``max`` and ``log sum exp(x - max)`` (kept apart so that ``x - max`` is exact,
  as in PyTorch's log_softmax; one fp32 log-sum-exp would lose 5e-4 of the exponent at logits of 1e4), and the
  backward *recomputes* the softmax from them: logits read twice, gradient written once. In eager training
  (``_GradInForward``) the forward instead writes the gradient for an upstream gradient of 1 in the same sweep
  (the second pass over a pixel's classes hits L1/L2), and the backward of a summed or averaged loss scales it in
  place by the one upstream value, read by the kernel on the device: for the usual ``loss.backward()`` (1) that
  kernel touches nothing, so the op moves the floor's bytes, logits read once and gradient written once, with no
  host sync. (Until session 12 the CUDA path always recomputed, since scaling a precomputed gradient seemed to
  need either a host sync or a fourth logits-sized pass.) A per-pixel upstream (``reduction="none"``) costs one
  out-of-place scaling pass; a second backward through the same graph recomputes.
- CPU (``cpu``): when a gradient is needed, one kernel computes the loss and the gradient for an upstream
  gradient of 1 while each tile is still in L1. The CPU forward is compute-bound (the exp sweep, not memory,
  sets its speed), so a second sweep in the backward costs more than it saves (measured 1.45x slower at
  8x21x512x512). In the backward a scalar upstream gradient (sum/mean reductions) is read from host memory
  without any sync: 1.0, the usual ``loss.backward()`` of the summed loss, returns the gradient as is; any other
  upstream gradient costs one scaling pass.
- Reductions (sum, mean) run in PyTorch on the per-pixel loss: 1/C of the logits' size, deterministic.

Bad labels (outside [0, C) and not ``ignore_index``): on CPU tensors every backend raises ``ValueError``. On CUDA
tensors raising would need a device-to-host sync, so by default the ``cuda`` and ``triton`` kernels instead make
that pixel's loss NaN (never reading out of bounds); pass ``check_labels=True`` to get the ``ValueError`` at the
cost of one sync. All pixels ignored: ``sum`` gives 0 and ``mean`` gives NaN, as ``F.cross_entropy`` does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fcnkern import _amp, _autograd, _ext
from fcnkern import backend as _backend
from fcnkern.second_order import differentiable_grad

__all__ = ["check_loss_options", "pixelwise_cross_entropy", "reduce_pixel_loss", "validate_labels"]

Reduction = Literal["sum", "mean", "none"]
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------------


def _validate(logits: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int, reduction: str) -> None:
    if not isinstance(logits, Tensor) or not isinstance(target, Tensor):
        raise TypeError("logits and target must be tensors")
    if logits.dim() != 4:
        raise ValueError(f"logits must be N x C x H x W, got shape {tuple(logits.shape)}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"logits must be float32, float16 or bfloat16 (or float64), got {logits.dtype}")
    if target.dtype != torch.int64:
        raise TypeError(f"target must hold int64 class indices, got {target.dtype}")
    n, c, h, w = logits.shape
    if target.shape != (n, h, w):
        raise ValueError(f"target shape {tuple(target.shape)} does not match logits: expected {(n, h, w)}")
    if c == 0:
        raise ValueError("logits have no classes (C = 0)")
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits are on {logits.device}")
    check_loss_options(weight, c, logits.device, ignore_index, reduction)


def check_loss_options(
    weight: Tensor | None, num_classes: int, device: torch.device, ignore_index: int, reduction: str
) -> None:
    """Raise on a bad class weight (C floats on ``device``, no gradient), ignore_index or reduction."""
    if weight is not None:
        if not isinstance(weight, Tensor) or weight.shape != (num_classes,):
            got = getattr(weight, "shape", weight)
            raise ValueError(f"weight must be a tensor of {num_classes} class weights, got {got}")
        if weight.device != device:
            raise ValueError(f"weight is on {weight.device} but the scores are on {device}")
        if not weight.is_floating_point():
            raise TypeError(f"weight must be floating point, got {weight.dtype}")
        if weight.requires_grad:
            raise ValueError("a gradient with respect to weight is not supported (as in F.cross_entropy)")
    if reduction not in ("sum", "mean", "none"):
        raise ValueError(f"reduction must be 'sum', 'mean' or 'none', got {reduction!r}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not -(2**63) <= ignore_index < 2**63:  # the kernels and the label comparison take it as an int64
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index}")


def validate_labels(target: Tensor, num_classes: int, ignore_index: int) -> None:
    """Raise ValueError if a label is outside [0, num_classes) and not ignore_index. Syncs on CUDA tensors."""
    bad = ((target < 0) | (target >= num_classes)) & (target != ignore_index)
    if bool(bad.any()):
        value = int(target[bad][0])
        raise ValueError(
            f"target contains label {value}, outside [0, {num_classes}) and not ignore_index ({ignore_index})"
        )


# ---------------------------------------------------------------------------------------------------------------
# Triton backend: custom ops around the kernels in fcnkern.kernels.cross_entropy
# ---------------------------------------------------------------------------------------------------------------


def _pixel_strides(t: Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(-2), t.stride(-1)


def _pixel_rows(h: int, w: int, *tensors: Tensor) -> tuple[int, int]:
    """(rows, row length) per image for the Triton kernels, which tile one row at a time: a whole image is one row of
    h * w pixels where every tensor's rows lie back to back (stride_h == w * stride_w: contiguous NCHW, an expanded
    upstream gradient), so that narrow images do not leave most of a tile idle; else the image's own h x w."""
    if all(t.stride(-2) == w * t.stride(-1) for t in tensors):
        return 1, h * w
    return h, w


def _row_grid(n: int, rows: int, row_len: int, block: int) -> tuple[int]:
    return (n * rows * _cdiv(row_len, block),)


def _triton_fwd_launch(
    logits: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int, with_grad: bool
) -> tuple[Tensor, Tensor]:
    """(loss N x H x W, stats 2 x N x H x W), or with_grad (loss, gradient for an upstream gradient of 1)."""
    from fcnkern.kernels import cross_entropy as k

    n, c, h, w = logits.shape
    acc = _acc_dtype(logits.dtype)
    if logits.device.type == "cpu":  # interpreter: checking costs no sync here
        validate_labels(target, c, ignore_index)
    loss = _ext.maybe_poison(torch.empty((n, h, w), dtype=acc, device=logits.device))
    if with_grad:
        second = _ext.maybe_poison(torch.empty_like(logits))
    else:
        second = _ext.maybe_poison(torch.empty((2, n, h, w), dtype=acc, device=logits.device))
    num_pixels = n * h * w
    if num_pixels == 0 or second.numel() == 0:
        return loss, second
    rows, row_len = _pixel_rows(h, w, logits, target, *((second,) if with_grad else ()))
    # Each mode leaves one pointer unused (no gradient, or no statistics): any pointer of the listed dtype will do,
    # so that the launch is the kernel variant launch_configs compiles.
    grad = second if with_grad else logits
    stats = loss if with_grad else second
    k.ce_fwd_kernel[_row_grid(n, rows, row_len, k.CE_BLOCK_P)](
        logits, target, weight if weight is not None else loss, loss, stats, grad,
        num_pixels, c, rows, row_len,
        logits.stride(0), logits.stride(1), logits.stride(2), logits.stride(3),
        *_pixel_strides(target),
        grad.stride(0), grad.stride(1), grad.stride(2), grad.stride(3),
        ignore_index, weight is not None,
        WITH_GRAD=with_grad, ACC=_tl_dtype(acc), BLOCK_P=k.CE_BLOCK_P,
        BLOCK_C=k.ce_block_c(c), ONE_CHUNK=c <= k.ce_block_c(c), num_warps=k.CE_NUM_WARPS,
    )  # fmt: skip
    return loss, second


@torch.library.custom_op("fcnkern::triton_pixelwise_ce_fwd", mutates_args=())
def _triton_fwd(logits: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Returns (loss N x H x W, stats 2 x N x H x W), as the C++ op ``fcnkern::pixelwise_ce_fwd`` does."""
    return _triton_fwd_launch(logits, target, weight, ignore_index, False)


@torch.library.custom_op("fcnkern::triton_pixelwise_ce_fwd_grad", mutates_args=())
def _triton_fwd_grad(
    logits: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Returns (loss N x H x W, the logits' gradient for an upstream gradient of 1), as the C++ op
    ``fcnkern::pixelwise_ce_fwd_grad`` does."""
    return _triton_fwd_launch(logits, target, weight, ignore_index, True)


def _is_dense(t: Tensor) -> bool:
    """Whether t's elements fill its storage span exactly, in some order of its dimensions (no gaps, no overlaps)."""
    expected = 1
    for stride, size in sorted((stride, size) for size, stride in zip(t.shape, t.stride(), strict=True) if size != 1):
        if stride != expected:
            return False
        expected *= size
    return True


@torch.library.custom_op("fcnkern::triton_pixelwise_ce_scale_grad_", mutates_args=("grad",))
def _triton_scale_grad(grad: Tensor, scale: Tensor) -> None:
    """grad *= scale[0] in place, zeros kept exactly zero, and no pass over grad at all when scale[0] is 1 (decided
    on the device: no sync). grad must be dense; scale one value in the accumulation dtype, on grad's device."""
    from fcnkern.kernels import cross_entropy as k

    if not _is_dense(grad):
        raise ValueError("grad must be dense (no gaps, no overlaps)")
    acc = _acc_dtype(grad.dtype)
    if scale.numel() != 1 or scale.dtype != acc or scale.device != grad.device:
        raise ValueError(f"scale must be one {acc} value on {grad.device}")
    if grad.numel() > 0:
        k.ce_scale_kernel[(_cdiv(grad.numel(), k.CE_SCALE_BLOCK),)](
            grad, scale, grad.numel(), BLOCK=k.CE_SCALE_BLOCK, num_warps=k.CE_NUM_WARPS
        )


@torch.library.custom_op("fcnkern::triton_pixelwise_ce_bwd", mutates_args=())
def _triton_bwd(
    grad_loss: Tensor, logits: Tensor, target: Tensor, weight: Tensor | None, stats: Tensor, ignore_index: int
) -> Tensor:
    from fcnkern.kernels import cross_entropy as k

    n, c, h, w = logits.shape
    grad = _ext.maybe_poison(torch.empty_like(logits))
    num_pixels = n * h * w
    if grad.numel() == 0:
        return grad
    rows, row_len = _pixel_rows(h, w, grad_loss, logits, target, grad)
    k.ce_bwd_kernel[_row_grid(n, rows, row_len, k.CE_BLOCK_P)](
        grad_loss, logits, target, weight if weight is not None else stats, stats, grad,
        num_pixels, c, rows, row_len,
        *_pixel_strides(grad_loss),
        logits.stride(0), logits.stride(1), logits.stride(2), logits.stride(3),
        *_pixel_strides(target),
        grad.stride(0), grad.stride(1), grad.stride(2), grad.stride(3),
        ignore_index, weight is not None,
        ACC=_tl_dtype(_acc_dtype(logits.dtype)), BLOCK_P=k.CE_BLOCK_P,
        BLOCK_C=k.ce_block_c(c), num_warps=k.CE_NUM_WARPS,
    )  # fmt: skip
    return grad


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _tl_dtype(dtype: torch.dtype):
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32


# ---------------------------------------------------------------------------------------------------------------
# Fake kernels and autograd, shared by the Triton ops and the C++/CUDA ops (registered once those exist)
# ---------------------------------------------------------------------------------------------------------------


def _fake_fwd(logits: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int) -> tuple[Tensor, Tensor]:
    n, _, h, w = logits.shape
    acc = _acc_dtype(logits.dtype)
    return logits.new_empty((n, h, w), dtype=acc), logits.new_empty((2, n, h, w), dtype=acc)


def _fake_bwd(grad_loss, logits, target, weight, stats, ignore_index):
    return torch.empty_like(logits)


def _register(fwd_name: str, bwd_op) -> None:
    def setup_context(ctx, inputs, output):
        logits, target, weight, ignore_index = inputs
        _, stats = output
        ctx.save_for_backward(logits, target, weight, stats)
        ctx.ignore_index = ignore_index
        ctx.mark_non_differentiable(stats)
        ctx.set_materialize_grads(False)  # no zero-filled gradient for the unused stats output

    def backward(ctx, grad_loss, _grad_stats):
        if grad_loss is None:
            return None, None, None, None
        logits, target, weight, stats = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a gradient that autograd can differentiate again
            return _differentiable_grad(logits, target, weight, ctx.ignore_index, grad_loss), None, None, None
        grad = _autograd.backward_call(bwd_op, grad_loss, logits, target, weight, stats, ctx.ignore_index)
        return grad, None, None, None

    _autograd.register_autograd(fwd_name, backward, setup_context)


def _fake_fwd_grad(logits: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int) -> tuple[Tensor, Tensor]:
    n, _, h, w = logits.shape
    return logits.new_empty((n, h, w), dtype=_acc_dtype(logits.dtype)), torch.empty_like(logits)


def _differentiable_grad(logits: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int, grad_loss: Tensor):
    """The logits' gradient for upstream grad_loss (N x H x W) by F.cross_entropy's formula, kept differentiable
    (second-order gradients: see fcnkern.second_order)."""

    def per_pixel(x: Tensor) -> Tensor:
        return F.cross_entropy(x.to(_acc_dtype(x.dtype)), target, weight, ignore_index=ignore_index, reduction="none")

    return differentiable_grad(per_pixel, logits, grad_loss)


def _setup_fwd_grad(ctx, inputs, output):
    logits, target, weight, ignore_index = inputs
    _, grad = output
    # logits and weight only for a create_graph=True backward; a reference, usually held by the caller anyway
    ctx.save_for_backward(grad, target, logits, weight)
    ctx.ignore_index = ignore_index
    ctx.mark_non_differentiable(grad)
    # Otherwise autograd fills an N x C x H x W zero gradient for the grad output: measured 32 ms of a 90 ms step.
    ctx.set_materialize_grads(False)


def _backward_fwd_grad(ctx, grad_loss, _grad_grad):
    if grad_loss is None:
        return None, None, None, None
    grad, target, logits, weight = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: a gradient that autograd can differentiate again
        return _differentiable_grad(logits, target, weight, ctx.ignore_index, grad_loss), None, None, None
    return _scale_precomputed_grad(grad, grad_loss, target, ctx.ignore_index), None, None, None


def scale_by_cpu_scalar(grad: Tensor, grad_loss: Tensor) -> Tensor | None:
    """grad (computed for an upstream gradient of 1) times the upstream gradient, when that is one finite value
    broadcast over the pixels (stride 0: the gradient of a sum or mean) on a CPU tensor in eager mode, where reading
    it costs no sync: grad itself for 1 (loss.backward()), else one multiply. None otherwise (a per-pixel or device
    upstream, or an infinite one), for the caller's general path."""
    if grad_loss.numel() == 0 or grad_loss.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    if any(step != 0 for step in grad_loss.stride()):
        return None
    value = float(grad_loss.reshape(-1)[0])
    if value == 1.0:
        return grad
    return (grad * value).to(grad.dtype) if math.isfinite(value) else None


def _scale_precomputed_grad(grad: Tensor, grad_loss: Tensor, target: Tensor, ignore_index: int) -> Tensor:
    """grad (computed for an upstream gradient of 1) times the real upstream gradient. Out of place, so that
    several backwards through one graph (gradcheck, retain_graph=True) stay right. Ignored pixels get exactly 0
    whatever the upstream value, as in PyTorch: a mean over no pixels sends an infinite upstream gradient."""
    if grad_loss.numel() == 0:
        return grad
    scaled = scale_by_cpu_scalar(grad, grad_loss)
    if scaled is not None:
        return scaled
    upstream = torch.where(target == ignore_index, 0.0, grad_loss)
    return (grad * upstream.unsqueeze(1)).to(grad.dtype)


class _DeviceOps(NamedTuple):
    """One GPU backend's cross-entropy ops (the triton ones also run on CPU tensors under the interpreter)."""

    fwd: Callable[..., tuple[Tensor, Tensor]]
    bwd: Callable[..., Tensor]
    fwd_grad: Callable[..., tuple[Tensor, Tensor]]
    scale_grad_: Callable[[Tensor, Tensor], None]


def _device_ops(be: str) -> _DeviceOps:
    prefix = "triton_" if be == "triton" else ""
    names = ("pixelwise_ce_fwd", "pixelwise_ce_bwd", "pixelwise_ce_fwd_grad", "pixelwise_ce_scale_grad_")
    return _DeviceOps(*(getattr(torch.ops.fcnkern, prefix + name).default for name in names))


def _one_upstream_value(grad_loss: Tensor) -> Tensor | None:
    """The single value that a summed or averaged loss broadcasts as its per-pixel upstream gradient (all strides
    0), as a one-element tensor on its device; None for a per-pixel upstream gradient."""
    if grad_loss.numel() == 0 or any(step != 0 for step in grad_loss.stride()):
        return None
    return grad_loss.as_strided((1,), (1,))


class _GradInForward(torch.autograd.Function):
    """Eager training path of the cuda and triton backends: the forward writes the loss and the logits' gradient
    for an upstream gradient of 1 in one sweep (the logits read once from DRAM); the backward of a summed or
    averaged loss scales that gradient in place by the upstream value, on the device, which is no work at all
    for the usual 1 (see ce_scale_kernel). Fewest bytes: read the logits once, write the gradient once, where
    recomputing in the backward reads them twice. The gradient is held on ctx, not saved for backward, since it is
    modified in place and handed on; a second backward through the graph (retain_graph=True) recomputes. Under
    torch.compile the registered ops (recompute) are used instead."""

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int, ops: _DeviceOps):
        loss, grad = _autograd.kernel(ops.fwd_grad, logits, target, weight, ignore_index)
        ctx.save_for_backward(logits, target, weight)
        ctx.grad, ctx.ops, ctx.ignore_index = grad, ops, ignore_index
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        logits, target, weight = ctx.saved_tensors
        ii = ctx.ignore_index
        if torch.is_grad_enabled():  # create_graph=True: a gradient that autograd can differentiate again
            return _differentiable_grad(logits, target, weight, ii, grad_loss), None, None, None, None
        grad, scale = ctx.grad, _one_upstream_value(grad_loss)
        if grad is None:  # handed on by an earlier backward through this graph: recompute it, for upstream 1
            _, stats = _autograd.kernel(ctx.ops.fwd, logits, target, weight, ii)
            ones = grad_loss.new_ones(()).expand(grad_loss.shape)
            grad = _autograd.kernel(ctx.ops.bwd, ones, logits, target, weight, stats, ii)
            ctx.grad = grad
        if scale is not None:  # the same scaling whichever backward this is: reentrant, bit for bit
            ctx.grad = None
            _autograd.kernel(ctx.ops.scale_grad_, grad, scale)
            return grad, None, None, None, None
        return _scale_precomputed_grad(grad, grad_loss, target, ii), None, None, None, None


def _register_cpp_ops() -> None:
    torch.library.register_fake("fcnkern::pixelwise_ce_fwd")(_fake_fwd)
    torch.library.register_fake("fcnkern::pixelwise_ce_fwd_grad")(_fake_fwd_grad)
    torch.library.register_fake("fcnkern::pixelwise_ce_bwd")(_fake_bwd)
    torch.library.register_fake("fcnkern::pixelwise_ce_scale_grad_")(_fake_scale_grad)
    _register("fcnkern::pixelwise_ce_fwd", torch.ops.fcnkern.pixelwise_ce_bwd)
    _autograd.register_autograd("fcnkern::pixelwise_ce_fwd_grad", _backward_fwd_grad, _setup_fwd_grad)


def _fake_scale_grad(grad: Tensor, scale: Tensor) -> None:
    return None


_triton_fwd.register_fake(_fake_fwd)
_triton_bwd.register_fake(_fake_bwd)
_triton_fwd_grad.register_fake(_fake_fwd_grad)
_triton_scale_grad.register_fake(_fake_scale_grad)
_register("fcnkern::triton_pixelwise_ce_fwd", _triton_bwd)
_autograd.register_autograd("fcnkern::triton_pixelwise_ce_fwd_grad", _backward_fwd_grad, _setup_fwd_grad)
_ext.on_load(_register_cpp_ops)


# ---------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------


def _kernel_forward(be: str, logits: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int) -> Tensor:
    """Per-pixel loss from backend ``be``'s kernels, differentiable with respect to logits."""
    training = logits.requires_grad and torch.is_grad_enabled()
    if be in ("triton", "cuda") and training and not torch.compiler.is_compiling():
        return _GradInForward.apply(logits, target, weight, ignore_index, _device_ops(be))
    if be == "triton":
        return _autograd.call("fcnkern::triton_pixelwise_ce_fwd", logits, target, weight, ignore_index)[0]
    if be == "cpu" and training:
        return _autograd.call("fcnkern::pixelwise_ce_fwd_grad", logits, target, weight, ignore_index)[0]
    return _autograd.call("fcnkern::pixelwise_ce_fwd", logits, target, weight, ignore_index)[0]


def pixelwise_cross_entropy(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    ignore_index: int = 255,
    reduction: Reduction = "sum",
    *,
    backend: str | None = None,
    check_labels: bool | None = None,
) -> Tensor:
    """Softmax cross-entropy of every pixel, reduced like ``F.cross_entropy``.

    Args:
        logits: N x C x H x W class scores, float32/float16/bfloat16 (float64 for gradchecks), any strides
            (NCHW, channels_last, cropped views).
        target: N x H x W int64 labels in [0, C), or ``ignore_index``.
        weight: optional C class weights (any float dtype; used in fp32).
        ignore_index: label whose pixels contribute neither loss nor gradient (PASCAL VOC's void is 255).
        reduction: ``"sum"`` over all pixels (the FCN paper's loss), ``"mean"`` (divided by the summed weight of the
            non-ignored pixels, as PyTorch does) or ``"none"`` (N x H x W).
        backend: ``"triton"``, ``"cuda"``, ``"cpu"``, ``"torch"`` or None for the current choice
            (see :mod:`fcnkern.backend`).
        check_labels: True: raise ValueError on out-of-range labels on every device (a sync on CUDA). None
            (default): raise where that costs no sync (CPU tensors), and on the torch backend on every device
            (PyTorch's CUDA kernel would hit a device-side assert); with the triton and cuda kernels a bad label
            makes the loss NaN. False: never check eagerly. Under torch.compile no eager check runs; the C++ CPU
            kernel still raises.

    Returns:
        The loss in ``logits.dtype`` (float32 under ``torch.autocast``, as F.cross_entropy's; the kernels read
        fp16/bf16 logits as they are and compute in fp32 either way): a scalar for sum/mean, N x H x W for none.
        Computed in fp32, then rounded: as with ``F.cross_entropy``, an fp16 sum over a large batch can exceed
        fp16's 65504 and be inf (150 classes over 210 x 55 pixels is ~1e5) while the gradient stays finite; take
        ``reduction="mean"`` or bf16 there.
    """
    _validate(logits, target, weight, ignore_index, reduction)
    out_dtype = _amp.loss_dtype(logits)
    be = _backend.resolve(backend, logits.device.type, "pixelwise_cross_entropy")
    num_classes = logits.shape[1]
    # A data-dependent check cannot be traced; under torch.compile the kernels' own handling stands alone.
    eager = not torch.compiler.is_compiling()
    # The torch reference is checked on every device: PyTorch's CUDA kernel would stop the process with a
    # device-side assert on a bad label.
    own_check = check_labels is None and be == "torch"
    if eager and (check_labels or own_check):
        validate_labels(target, num_classes, ignore_index)
    if be == "torch":
        if weight is not None:  # float32 under autocast, which then computes in float32 (not a bf16-rounded weight)
            weight = weight.to(out_dtype)
        return F.cross_entropy(logits, target, weight=weight, ignore_index=ignore_index, reduction=reduction)

    if weight is not None:
        weight = weight.to(dtype=_acc_dtype(logits.dtype)).contiguous()

    if be != "triton":
        _ext.load()
    loss = _kernel_forward(be, logits, target, weight, ignore_index)
    return reduce_pixel_loss(loss, target, weight, ignore_index, reduction, out_dtype)


def reduce_pixel_loss(
    loss: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int, reduction: str, dtype: torch.dtype
) -> Tensor:
    """The per-pixel loss (N x H x W, fp32) reduced as F.cross_entropy does, in ``dtype``: mean divides by the
    summed class weight of the non-ignored pixels. Deterministic (a plain sum over a fixed shape)."""
    if reduction == "none":
        return loss.to(dtype)
    total = loss.sum()
    if reduction == "mean":
        valid = target != ignore_index
        if weight is None:
            denom = valid.sum(dtype=total.dtype)
        else:
            denom = torch.where(valid, weight[target.clamp(0, weight.shape[0] - 1)], 0).sum()
        total = total / denom
    return total.to(dtype)
