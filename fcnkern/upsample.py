"""Transposed-convolution upsampling with the crop folded in: FCN's "deconvolution" layers.

``upsample_crop(x, weight, stride, crop, out_size)`` is the value of
``F.conv_transpose2d(x, weight, bias, stride, groups=groups)[:, :, top:top + H, left:left + W]``, the way FCNs
upsample class scores and then crop them to the input. ``bilinear_upsample_crop`` is the fixed bilinear case
(kernel 2f, stride f, one channel at a time), which needs no weight tensor.

Kernels compute only the kept pixels (gather formulation: each output reads the few input taps that reach it), so
the crop costs nothing and the forward needs no atomics; the backward is a strided gather of the kept gradient
(dx) and a reduction over input pixels (dweight), never materialising the full uncropped output or its gradient.

- ``cpu`` (cpp/upsample_learned_cpu.cpp, cpp/upsample_cpu.cpp): the learned layer by output cell (the sh x sw
  pixels sharing (Y // sh, X // sw) read the same th x tw input taps): the forward is one GEMM per block of cells,
  taps x (the weight rearranged once per call), its kept pixels copied out in runs of sw columns; the backward is
  its adjoint (the kept gradient arranged by cell, one GEMM towards dx and one into dweight). Bilinear: separable
  2 x 2-tap tables built for the window only.
- ``triton`` (kernels/upsample.py): the same cell GEMMs on tensor cores, forward and backward, for layers with >= 8
  output channels per group; CUDA-core gathers for per-channel layers; bilinear forward with 2 x 2 taps and a
  separable two-pass backward.
- ``cuda`` (cpp/upsample_cuda.cu): one thread per output element of each kernel, CUDA cores (FCN's 21-channel
  layers are too narrow to pay for tensor-core tiles there); a shared-memory tree per weight element for dweight.
- ``torch``: the reference, ``F.conv_transpose2d`` then slicing.

Outputs keep x's memory format; accumulation is fp32 (fp64 for fp64).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fcnkern import _amp, _autograd, _ext
from fcnkern import backend as _backend
from fcnkern.conv_relu import _acc, _cdiv, _dot_precision, _index_type, _pair, _wgrad_splits
from fcnkern.second_order import register_reference_double_backward

__all__ = ["bilinear_kernel", "bilinear_upsample_crop", "bilinear_weight", "upsample_crop"]

# Backends with a kernel for each op.
IMPLEMENTED = {
    "upsample_crop": ("triton", "cuda", "cpu", "torch"),
    "bilinear_upsample_crop": ("triton", "cuda", "cpu", "torch"),
}
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def bilinear_kernel(kernel_size: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """The kernel_size x kernel_size bilinear interpolation filter that FCN initialises its upsampling with
    (Caffe's and pytorch-fcn's formula; kernel 2f for factor f)."""
    if kernel_size < 1:
        raise ValueError(f"kernel_size must be >= 1, got {kernel_size}")
    factor = (kernel_size + 1) // 2
    center = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    ramp = 1 - (torch.arange(kernel_size, dtype=torch.float64) - center).abs() / factor
    return torch.outer(ramp, ramp).to(dtype)


def bilinear_weight(channels: int, kernel_size: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """channels x channels x k x k ConvTranspose2d weight that upsamples every channel by itself (diagonal)."""
    weight = torch.zeros(channels, channels, kernel_size, kernel_size, dtype=dtype)
    weight[range(channels), range(channels)] = bilinear_kernel(kernel_size, dtype)
    return weight


def _check_window(full: tuple[int, int], crop: tuple[int, int], out_size: tuple[int, int]) -> None:
    if min(crop) < 0:
        raise ValueError(f"crop offsets must be >= 0, got {crop}")
    if min(out_size) < 0:
        raise ValueError(f"out_size must be >= 0, got {out_size}")
    for axis, full_len, start, length in zip(("height", "width"), full, crop, out_size, strict=True):
        if start + length > full_len:
            raise ValueError(
                f"crop window {start}:{start + length} along {axis} lies outside the upsampled output of {full_len}"
            )


def _check_factor(factor: int) -> None:
    """The bilinear factor: an int >= 1 (bool, though an int subclass, is refused: True would pass as 1)."""
    if not isinstance(factor, int) or isinstance(factor, bool) or factor < 1:
        raise ValueError(f"factor must be an int >= 1, got {factor!r}")


def _check_input(x: Tensor, name: str = "x") -> None:
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"{name} must be an N x C x h x w tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16 (or float64), got {x.dtype}")
    if min(x.shape[2:]) < 1:
        raise ValueError(f"{name} must have at least one pixel, got spatial size {tuple(x.shape[2:])}")
    if x.shape[1] < 1:  # PyTorch's conv_transpose2d and interpolate reject it too
        raise ValueError(f"{name} has no channels (C = 0): shape {tuple(x.shape)}")


def _out_like(x: Tensor, shape: tuple[int, ...]) -> Tensor:
    return torch.empty(shape, dtype=x.dtype, device=x.device).contiguous(
        memory_format=torch._prims_common.suggest_memory_format(x)
    )


def _crop(full: Tensor, crop: tuple[int, int], size: tuple[int, int], like: Tensor) -> Tensor:
    """The kept window of the full output, as a dense copy in ``like``'s memory format (a view would pin the full
    output)."""
    (top, left), (h, w) = crop, size
    window = full[:, :, top : top + h, left : left + w]
    channels_last = like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous()
    return window.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def upsample_crop(
    x: Tensor,
    weight: Tensor,
    stride: int | Sequence[int],
    crop: Sequence[int],
    out_size: Sequence[int],
    bias: Tensor | None = None,
    groups: int = 1,
    *,
    backend: str | None = None,
) -> Tensor:
    """Transposed convolution, cropped: ``F.conv_transpose2d(x, weight, bias, stride, groups=groups)`` restricted
    to rows ``crop[0]:crop[0] + out_size[0]`` and columns ``crop[1]:crop[1] + out_size[1]``.

    Args:
        x: N x Cin x h x w, float32/float16/bfloat16 (float64 for gradchecks), NCHW or channels_last.
        weight: Cin x (Cout / groups) x kh x kw, x's dtype and device.
        stride: upsampling factor, an int or (sh, sw).
        crop: (top, left) offset of the kept window in the full output, >= 0.
        out_size: (H, W) of the kept window, which must lie inside the full (h - 1) * s + k output (a 0 gives an
            empty result, as slicing would).
        bias: optional Cout vector.
        groups: as in ConvTranspose2d (Cin for a per-channel layer).
        backend: ``"triton"``, ``"cuda"``, ``"cpu"``, ``"torch"`` or None for the current choice (see
            :mod:`fcnkern.backend`).

    Returns:
        N x Cout x H x W in x's dtype and memory format (under ``torch.autocast``, x, weight and bias are cast to its
        dtype first, as for ``F.conv_transpose2d``).
    """
    x, weight, bias = _amp.cast_for_convolution(x, weight, bias)
    _check_input(x)
    if not isinstance(weight, Tensor) or weight.dim() != 4:
        raise ValueError(f"weight must be Cin x Cout/groups x kh x kw, got {getattr(weight, 'shape', weight)}")
    if groups < 1 or x.shape[1] % groups != 0 or weight.shape[0] != x.shape[1]:
        raise ValueError(f"weight {tuple(weight.shape)} and groups={groups} do not fit {x.shape[1]} input channels")
    if weight.shape[1] < 1:
        raise ValueError(f"weight {tuple(weight.shape)} has no output channels")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"weight is {weight.dtype} on {weight.device}, x is {x.dtype} on {x.device}")
    if bias is not None and (
        not isinstance(bias, Tensor)
        or bias.shape != (weight.shape[1] * groups,)
        or bias.device != x.device
        or bias.dtype != x.dtype
    ):
        raise ValueError(f"bias must be a {x.dtype} vector of {weight.shape[1] * groups} on {x.device}")
    sh, sw = _pair(stride, "stride")
    if min(sh, sw) < 1:
        raise ValueError(f"stride must be >= 1, got {(sh, sw)}")
    crop_t, size_t = _pair(tuple(crop), "crop"), _pair(tuple(out_size), "out_size")
    full = ((x.shape[2] - 1) * sh + weight.shape[2], (x.shape[3] - 1) * sw + weight.shape[3])
    _check_window(full, crop_t, size_t)
    be = _backend.resolve(backend, x.device.type, "upsample_crop", IMPLEMENTED["upsample_crop"])
    if be == "torch" or 0 in size_t:  # an empty window leaves no pixel for a kernel: PyTorch's empty result
        return _crop(F.conv_transpose2d(x, weight, bias, (sh, sw), groups=groups), crop_t, size_t, x)
    args = (x, weight, bias, [sh, sw], list(crop_t), list(size_t), groups)
    if be == "triton":
        return _autograd.call("fcnkern::triton_upsample_crop", *args)
    _ext.load()
    return _autograd.call("fcnkern::upsample_crop", *args)


def bilinear_upsample_crop(
    x: Tensor,
    factor: int,
    crop: Sequence[int],
    out_size: Sequence[int],
    *,
    backend: str | None = None,
) -> Tensor:
    """Fixed bilinear upsampling by ``factor`` (kernel 2 * factor, each channel by itself), cropped to the
    ``out_size`` window at ``crop``: equal to the diagonal-weight ConvTranspose2d of FCN-32s's and FCN-8s's final
    layers followed by their crop. Gradient with respect to x only.

    Args:
        x: N x C x h x w, float32/float16/bfloat16 (float64 for gradchecks).
        factor: integer upsampling factor >= 1.
        crop, out_size: as in :func:`upsample_crop`.

    Returns:
        N x C x H x W in x's dtype and memory format (under ``torch.autocast``, in its dtype, as
        ``F.conv_transpose2d``).
    """
    (x,) = _amp.cast_for_convolution(x)
    _check_input(x)
    _check_factor(factor)
    k = 2 * factor
    crop_t, size_t = _pair(tuple(crop), "crop"), _pair(tuple(out_size), "out_size")
    _check_window(((x.shape[2] - 1) * factor + k, (x.shape[3] - 1) * factor + k), crop_t, size_t)
    be = _backend.resolve(backend, x.device.type, "bilinear_upsample_crop", IMPLEMENTED["bilinear_upsample_crop"])
    (top, left), (h, w) = crop_t, size_t
    if 0 in size_t:  # an empty window leaves no pixel for a kernel: PyTorch's empty result below
        be = "torch"
    if be == "triton":
        return _autograd.call("fcnkern::triton_bilinear_upsample_crop", x, factor, top, left, h, w)
    if be in ("cpu", "cuda"):
        _ext.load()
        return _autograd.call("fcnkern::bilinear_upsample_crop", x, factor, top, left, h, w)
    channels = x.shape[1]
    weight = bilinear_kernel(k, x.dtype).to(x.device).expand(channels, 1, k, k)
    return _crop(F.conv_transpose2d(x, weight, None, factor, groups=channels), crop_t, size_t, x)


def _fake_upsample(x, weight, bias, stride, crop, out_size, groups):
    return _out_like(x, (x.shape[0], weight.shape[1] * groups, *out_size))


def _fake_upsample_bwd(grad, x, weight, stride, crop, groups, output_mask):
    need_x, need_w, need_b = output_mask
    dx = _out_like(x, tuple(x.shape)) if need_x else x.new_empty(0)  # a fresh empty each: outputs may not alias
    dw = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_w else x.new_empty(0)
    return dx, dw, x.new_empty((grad.shape[1],)) if need_b else x.new_empty(0)


def _register_upsample_autograd(fwd_name: str, bwd_op) -> None:
    """One autograd formula for the Triton and the C++ learned ops, which share the schema
    (x, weight, bias, stride, crop, out_size, groups) -> out and the backward op's."""

    def setup_context(ctx, inputs, output):
        x, weight, bias, stride, crop, _, groups = inputs
        ctx.save_for_backward(x, weight)
        ctx.geometry = (stride, crop, groups)
        ctx.has_bias = bias is not None

    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        mask = [need_x, need_w, need_b and ctx.has_bias]
        grad = grad.contiguous(memory_format=torch._prims_common.suggest_memory_format(grad))
        dx, dw, db = _autograd.backward_call(bwd_op, grad, x, weight, *ctx.geometry, mask)
        return (dx if mask[0] else None, dw if mask[1] else None, db if mask[2] else None, None, None, None, None)

    _autograd.register_autograd(fwd_name, backward, setup_context)


def _reference_upsample_bwd(grad, x, weight, stride, crop, groups, output_mask):
    """The learned backward op's (dx, dweight, dbias), all three, in differentiable PyTorch ops (its double
    backward: see fcnkern.second_order); x and weight must require grad."""
    full = F.conv_transpose2d(x, weight, None, stride, groups=groups)
    kept = full[:, :, crop[0] : crop[0] + grad.shape[2], crop[1] : crop[1] + grad.shape[3]]
    dx, dw = torch.autograd.grad(kept, (x, weight), grad, create_graph=True)
    return dx, dw, grad.sum((0, 2, 3))


def _fake_bilinear(t, factor, top, left, h, w):  # forward and backward: N x C x h x w in t's memory format
    return _out_like(t, (t.shape[0], t.shape[1], h, w))


def _register_bilinear_autograd(fwd_name: str, fwd_op, bwd_name: str, bwd_op) -> None:
    """One autograd formula for the Triton and the C++ bilinear ops (x, factor, top, left, out_h, out_w) -> out,
    whose backward ops take (grad, factor, top, left, in_h, in_w); and the backward op's own: it is linear in grad
    with the forward as its adjoint, so its derivative is the forward kernel (double backward at kernel speed)."""

    def setup_context(ctx, inputs, output):
        t, factor, top, left, _, _ = inputs
        ctx.geometry = (factor, top, left, t.shape[2], t.shape[3])

    def backward(ctx, grad):
        return _autograd.backward_call(bwd_op, grad, *ctx.geometry), None, None, None, None, None

    def backward_of_backward(ctx, grad):
        return fwd_op(grad, *ctx.geometry), None, None, None, None, None

    _autograd.register_autograd(fwd_name, backward, setup_context)
    torch.library.register_autograd(bwd_name, backward_of_backward, setup_context=setup_context)


# ---------------------------------------------------------------------------------------------------------------
# Triton backend (kernels/upsample.py)
# ---------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("fcnkern::triton_upsample_crop", mutates_args=())
def _triton_upsample(
    x: Tensor, weight: Tensor, bias: Tensor | None, stride: list[int], crop: list[int], out_size: list[int],
    groups: int,
) -> Tensor:  # fmt: skip
    from fcnkern.kernels import upsample as k

    n, cin, h, w = x.shape
    cout_g, kh, kw = weight.shape[1:]
    (sh, sw), (top, left), (oh, ow) = stride, crop, out_size
    out = _ext.maybe_poison(_out_like(x, (n, cout_g * groups, oh, ow)))
    if out.numel() == 0:
        return out
    cin_g = cin // groups
    if cout_g >= k.DOT_MIN_CHANNELS:
        taps, cells = _cell_geometry(weight, stride, crop, out_size)
        a = _cell_weight(weight, groups, (sh, sw), taps)
        common = dict(ACC=_acc(x.dtype), INDEX=_index_type(x, a, out))
        bm, bn, bk, warps = k.cell_blocks(x.element_size())["fwd"]
        k.upsample_fwd_cells_kernel[(_cdiv(n * cells[0] * cells[1], bn), _cdiv(a.shape[1], bm), groups)](
            a, x, a if bias is None else bias, out,
            n, cin_g, h, w, cout_g, oh, ow, *x.stride(), *out.stride(), sh, sw, top, left, *taps, *cells,
            bias is not None, DOT_PRECISION=_dot_precision(x), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
            num_warps=warps, **common,
        )  # fmt: skip
        return out
    common = dict(ACC=_acc(x.dtype), INDEX=_index_type(x, weight, out))
    bm, bn, bk, warps = k.learned_blocks(n * oh * ow, cout_g, x.element_size(), False)
    m_blocks = _cdiv(n * oh * ow, bm)
    k.upsample_fwd_direct_kernel[(m_blocks * groups, _cdiv(cout_g, bn))](
        x, weight, weight if bias is None else bias, out,
        n, cin_g, h, w, cout_g, oh, ow,
        *x.stride(), *weight.stride(), *out.stride(),
        sh, sw, top, left, kh, kw, m_blocks, bias is not None,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, **common,
    )  # fmt: skip
    return out


def _cell_geometry(weight: Tensor, stride, crop, out_size) -> tuple[tuple[int, int], tuple[int, int]]:
    """The cell GEMMs' (taps, cells): input taps per cell (th, tw) = ceil(kernel / stride), and the rows and columns
    of sh x sw cells of the full output that the kept window touches."""
    kh, kw = weight.shape[2:]
    (sh, sw), (top, left), (oh, ow) = stride, crop, out_size
    return (_cdiv(kh, sh), _cdiv(kw, sw)), (_cdiv(top + oh, sh) - top // sh, _cdiv(left + ow, sw) - left // sw)


def _cell_weight(weight: Tensor, groups: int, stride: tuple[int, int], taps: tuple[int, int]) -> Tensor:
    """The cell GEMM's A operand (kernels/upsample.py): groups x (Cout_g * sh * sw) x (Cin_g * th * tw), contiguous,
    A[g, (co, py, px), (ci, t, u)] = weight[g Cin_g + ci, co, py + t sh, px + u sw], zero past the kernel. A zero
    tap times an infinite input gives NaN where conv_transpose2d skips the tap; only kernels that are not a multiple
    of the stride have such taps (FCN's are 2s)."""
    cin, cout_g, kh, kw = weight.shape
    (sh, sw), (th, tw) = stride, taps
    padded = F.pad(weight, (0, tw * sw - kw, 0, th * sh - kh)) if (kh, kw) != (th * sh, tw * sw) else weight
    a = padded.reshape(groups, cin // groups, cout_g, th, sh, tw, sw).permute(0, 2, 4, 6, 1, 3, 5)
    # With one tap per cell (a kernel no larger than the stride) the reshape can stay a strided view; the kernels
    # index A as row-major, so it is made contiguous (a view gave wrong outputs and dx for every k <= s layer).
    return a.reshape(groups, cout_g * sh * sw, cin // groups * th * tw).contiguous()


def _triton_upsample_dgrad(grad: Tensor, x: Tensor, weight: Tensor, stride, crop, groups: int) -> Tensor:
    from fcnkern.kernels import upsample as k

    n, cin, h, w = x.shape
    cout_g, kh, kw = weight.shape[1:]
    cin_g = cin // groups
    dx = _ext.maybe_poison(_out_like(x, tuple(x.shape)))
    use_dot = cin_g >= k.DOT_MIN_CHANNELS
    bm, bn, bk, warps = k.learned_blocks(n * h * w, cin_g, x.element_size(), use_dot)
    m_blocks = _cdiv(n * h * w, bm)
    k.upsample_dgrad_kernel[(m_blocks * groups, _cdiv(cin_g, bn))](
        grad, weight, dx,
        n, cin_g, h, w, cout_g, grad.shape[2], grad.shape[3],
        *grad.stride(), *weight.stride(), *dx.stride(),
        *stride, *crop, kh, kw, m_blocks,
        USE_DOT=use_dot, ACC=_acc(x.dtype), INDEX=_index_type(grad, weight, dx), DOT_PRECISION=_dot_precision(x),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
    )  # fmt: skip
    return dx


def _triton_upsample_wgrad(grad: Tensor, x: Tensor, weight: Tensor, stride, crop, groups: int) -> Tensor:
    from fcnkern.kernels import upsample as k

    n, cin, h, w = x.shape
    cout_g, kh, kw = weight.shape[1:]
    cin_g, j, pixels = cin // groups, cout_g * kh * kw, n * h * w
    use_dot = cin_g >= k.DOT_MIN_CHANNELS and j >= k.DOT_MIN_CHANNELS
    bm, bn, bk, warps = k.learned_blocks(cin_g, j, x.element_size(), use_dot)
    m_blocks = _cdiv(cin_g, bm)
    splits, per_split = _wgrad_splits(pixels, m_blocks * _cdiv(j, bn) * groups, bk, x.device)
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    parts = _ext.maybe_poison(torch.empty((splits, cin, j), dtype=acc_dtype, device=x.device))
    k.upsample_wgrad_kernel[(m_blocks * groups * splits, _cdiv(j, bn))](
        grad, x, parts,
        n, cin_g, h, w, cout_g, grad.shape[2], grad.shape[3],
        *grad.stride(), *x.stride(),
        *stride, *crop, kh, kw, m_blocks, groups, per_split,
        USE_DOT=use_dot, ACC=_acc(x.dtype), INDEX=_index_type(grad, x), DOT_PRECISION=_dot_precision(x),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
    )  # fmt: skip
    return parts.sum(0).reshape(weight.shape).to(weight.dtype)


def _triton_upsample_bwd_cells(
    grad: Tensor, x: Tensor, weight: Tensor, stride, crop, groups: int, need_x: bool, need_w: bool
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(dx, dweight) of the cell-GEMM forward, by its adjoint (kernels/upsample.py): the kept gradient arranged by
    cell times A^T gives each cell's tap gradients (split over the rows: a short, wide GEMM), which a second kernel
    sums into dx; taps^T times the same
    gradient gives dA, split over cells into an fp32 workspace, summed and put back in the weight's layout."""
    from fcnkern.kernels import upsample as k

    n, cin, h, w = x.shape
    cout_g, kh, kw = weight.shape[1:]
    (sh, sw), (top, left), (oh, ow) = stride, crop, grad.shape[2:]
    cin_g = cin // groups
    taps, cells = _cell_geometry(weight, stride, crop, (oh, ow))
    depth, rows, all_cells = cin_g * taps[0] * taps[1], cout_g * sh * sw, n * cells[0] * cells[1]
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    blocks = k.cell_blocks(x.element_size())
    common = dict(ACC=_acc(x.dtype), DOT_PRECISION=_dot_precision(x))
    dx, dw = x.new_empty(0), x.new_empty(0)
    if need_x:
        bm, bn, bk, warps = blocks["dgrad"]
        a = _cell_weight(weight, groups, (sh, sw), taps)
        programs = _cdiv(all_cells, bm) * _cdiv(depth, bn) * groups
        splits, per_split = _wgrad_splits(rows, programs, bk, x.device)
        shape = (groups, splits, all_cells, depth)
        dtaps = _ext.maybe_poison(torch.empty(shape, dtype=acc_dtype, device=x.device))
        k.upsample_dgrad_cells_kernel[(_cdiv(all_cells, bm), _cdiv(depth, bn), groups * splits)](
            grad, a, dtaps, n, cin_g, cout_g, oh, ow, *grad.stride(), sh, sw, top, left, *taps, *cells,
            splits, per_split, INDEX=_index_type(grad, a, dtaps), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
            num_warps=warps, **common,
        )  # fmt: skip
        dx = _ext.maybe_poison(_out_like(x, tuple(x.shape)))
        k.upsample_dgrad_fold_kernel[(_cdiv(dx.numel(), k.FOLD_BLOCK),)](
            dtaps, dx, n, cin_g, h, w, groups, *dx.stride(), *taps, *cells, top // sh, left // sw, splits,
            ACC=_acc(x.dtype), INDEX=_index_type(dtaps, dx), BLOCK=k.FOLD_BLOCK, num_warps=4,
        )  # fmt: skip
    if need_w:
        bm, bn, bk, warps = blocks["wgrad"]
        programs = _cdiv(rows, bn) * _cdiv(depth, bm) * groups
        splits, per_split = _wgrad_splits(all_cells, programs, bk, x.device)
        parts = _ext.maybe_poison(torch.empty((groups, splits, depth, rows), dtype=acc_dtype, device=x.device))
        k.upsample_wgrad_cells_kernel[(_cdiv(rows, bn), _cdiv(depth, bm), groups * splits)](
            grad, x, parts, n, cin_g, h, w, cout_g, oh, ow, *grad.stride(), *x.stride(),
            sh, sw, top, left, *taps, *cells, splits, per_split,
            INDEX=_index_type(grad, x, parts), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, **common,
        )  # fmt: skip
        da = parts.sum(1).view(groups, cin_g, taps[0], taps[1], cout_g, sh, sw)
        full = da.permute(0, 1, 4, 2, 5, 3, 6).reshape(cin, cout_g, taps[0] * sh, taps[1] * sw)
        dw = full[:, :, :kh, :kw].to(weight.dtype).contiguous()
    return dx, dw


@torch.library.custom_op("fcnkern::triton_upsample_crop_bwd", mutates_args=())
def _triton_upsample_bwd(
    grad: Tensor, x: Tensor, weight: Tensor, stride: list[int], crop: list[int], groups: int, output_mask: list[bool]
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias) as output_mask asks, zero-size where not asked (the C++ op's contract). The bias
    gradient is a plain reduction of the kept gradient."""
    from fcnkern.kernels import upsample as k

    need_x, need_w, need_b = output_mask
    # a fresh empty for each output not asked for: a custom op's outputs may not alias one another
    if weight.shape[1] >= k.DOT_MIN_CHANNELS:  # layers with a cell-GEMM forward get its adjoint
        dx, dw = _triton_upsample_bwd_cells(grad, x, weight, stride, crop, groups, need_x, need_w)
    else:
        dx = _triton_upsample_dgrad(grad, x, weight, stride, crop, groups) if need_x else x.new_empty(0)
        dw = _triton_upsample_wgrad(grad, x, weight, stride, crop, groups) if need_w else x.new_empty(0)
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    db = grad.sum((0, 2, 3), dtype=acc_dtype).to(grad.dtype) if need_b else x.new_empty(0)
    return dx, dw, db


def _check_bilinear_rows(n: int, c: int, h: int) -> None:
    """The Triton bilinear passes number their N x C x H rows in int32 (kernels/upsample.py, _row_tile)."""
    if n * c * h >= 2**31 - 64:
        raise ValueError(
            f"bilinear_upsample_crop on the triton backend: {n} x {c} x {h} = {n * c * h} rows of output (or of its "
            "gradient) is more than its kernels index (2**31 - 64); split the batch or use the cuda backend"
        )


@torch.library.custom_op("fcnkern::triton_bilinear_upsample_crop", mutates_args=())
def _triton_bilinear(x: Tensor, factor: int, top: int, left: int, out_h: int, out_w: int) -> Tensor:
    from fcnkern.kernels import upsample as k

    n, c, h, w = x.shape
    out = _ext.maybe_poison(_out_like(x, (n, c, out_h, out_w)))
    if out.numel() > 0:
        _check_bilinear_rows(n, c, out_h)
        rows, block = k.bilinear_block(out_w)
        k.bilinear_fwd_kernel[(_cdiv(n * c * out_h, rows) * _cdiv(out_w, block),)](
            x, out, n, c, h, w, out_h, out_w, *x.stride(), *out.stride(), factor, top, left,
            ACC=_acc(x.dtype), ROWS=rows, BLOCK=block, num_warps=4,
        )  # fmt: skip
    return out


@torch.library.custom_op("fcnkern::triton_bilinear_upsample_crop_bwd", mutates_args=())
def _triton_bilinear_bwd(grad: Tensor, factor: int, top: int, left: int, in_h: int, in_w: int) -> Tensor:
    from fcnkern.kernels import upsample as k

    n, c, out_h, out_w = grad.shape
    dx = _ext.maybe_poison(_out_like(grad, (n, c, in_h, in_w)))
    if dx.numel() == 0:
        return dx
    _check_bilinear_rows(n, c, max(out_h, in_h))
    acc_dtype = torch.float64 if grad.dtype == torch.float64 else torch.float32
    by_col = _ext.maybe_poison(torch.empty((n, c, out_h, in_w), dtype=acc_dtype, device=grad.device))
    acc = _acc(grad.dtype)
    rows, block, taps = k.bilinear_width_tile(in_w, factor)
    k.bilinear_bwd_width_kernel[(_cdiv(n * c * out_h, rows) * _cdiv(in_w, block),)](
        grad, by_col, n, c, out_h, in_w, *grad.stride(), *by_col.stride(), factor, left, out_w,
        ACC=acc, ROWS=rows, BLOCK=block, TAPS=taps, num_warps=4,
    )  # fmt: skip
    rows, block = k.bilinear_block(in_w)
    k.bilinear_bwd_height_kernel[(_cdiv(n * c * in_h, rows) * _cdiv(in_w, block),)](
        by_col, dx, n, c, in_h, in_w, *by_col.stride(), *dx.stride(), factor, top, out_h,
        ACC=acc, ROWS=rows, BLOCK=block, num_warps=4,
    )  # fmt: skip
    return dx


_triton_upsample.register_fake(_fake_upsample)
_triton_upsample_bwd.register_fake(_fake_upsample_bwd)
_register_upsample_autograd("fcnkern::triton_upsample_crop", _triton_upsample_bwd)
register_reference_double_backward("fcnkern::triton_upsample_crop_bwd", _reference_upsample_bwd)
_triton_bilinear.register_fake(_fake_bilinear)
_triton_bilinear_bwd.register_fake(_fake_bilinear)
_register_bilinear_autograd(
    "fcnkern::triton_bilinear_upsample_crop", _triton_bilinear, "fcnkern::triton_bilinear_upsample_crop_bwd",
    _triton_bilinear_bwd,
)  # fmt: skip


def _register_cpp_ops() -> None:
    torch.library.register_fake("fcnkern::upsample_crop")(_fake_upsample)
    torch.library.register_fake("fcnkern::upsample_crop_bwd")(_fake_upsample_bwd)
    _register_upsample_autograd("fcnkern::upsample_crop", torch.ops.fcnkern.upsample_crop_bwd)
    register_reference_double_backward("fcnkern::upsample_crop_bwd", _reference_upsample_bwd)
    torch.library.register_fake("fcnkern::bilinear_upsample_crop")(_fake_bilinear)
    torch.library.register_fake("fcnkern::bilinear_upsample_crop_bwd")(_fake_bilinear)
    _register_bilinear_autograd(
        "fcnkern::bilinear_upsample_crop", torch.ops.fcnkern.bilinear_upsample_crop,
        "fcnkern::bilinear_upsample_crop_bwd", torch.ops.fcnkern.bilinear_upsample_crop_bwd,
    )  # fmt: skip


_ext.on_load(_register_cpp_ops)
