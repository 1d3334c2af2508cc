"""Fused Conv2d + ReLU, forward and backward: the convolutions of an FCN (VGG16's 3x3 layers, fc6 as a 7x7 conv,
fc7 and the score layers as 1x1 convs).

``conv2d_relu(x, weight, bias, stride, padding, dilation, groups)`` equals
``F.relu(F.conv2d(x, weight, bias, stride, padding, dilation, groups))``; ``relu=False`` gives the plain conv
through the same kernels (FCN's score layers).

Kernels (see kernels/conv_relu.py and cpp/):

- ``triton``: implicit GEMMs over channels_last activations and a K x R x S x C weight (tensors in another layout
  are copied into these on entry, and the results back into x's format), bias and ReLU in the forward's epilogue;
  the backward's dgrad and wgrad kernels load the output gradient through the ReLU mask of the saved output, so
  the masked gradient is never materialised.
- ``cuda`` (cpp/conv_relu_cuda.cu): one gather-GEMM core for the forward, dgrad and wgrad implicit GEMMs (operands
  gathered through strides into shared-memory tiles, WMMA tensor cores for fp16/bf16, CUDA cores in fp32/fp64), the
  ReLU mask applied while loading the gradient, wgrad's pixel reduction split into a workspace summed afterwards.
- ``cpu`` (cpp/conv_relu_cpu.cpp, cpp/conv_relu_winograd_cpu.cpp, cpp/conv_relu_blocked_cpu.cpp): Winograd
  F(2x2, 3x3) for the forward and dx and F(3x3, 2x2) for dW of large 3x3 stride-1 layers with at least 64 channels
  per group (VGG's conv1_2..conv5_3); register-blocked direct convolution (FMA micro-kernels, forward, dx and dW)
  for stride-1 layers of at most 64 channels in and out (narrow networks); for a batch of small maps (up to 64
  output pixels per image, 255 for 1x1: fc6, fc7) one GEMM per group over every image's pixels; shifted GEMMs for
  1x1 and very deep stride-1 layers; otherwise blocked im2col + the BLAS GEMM ATen links. Bias and ReLU are
  applied to each output block while it is in cache; the backward masks each gradient block once as it loads it.
- ``torch``: the reference, ``F.relu(F.conv2d(...))``.

The output keeps x's memory format (NCHW or channels_last). The backward saves x, weight and the output (the mask
is PyTorch's threshold_backward rule: an output <= 0 passes no gradient, so an output of exactly 0 passes
none and a NaN output passes its gradient).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fcnkern import _amp, _autograd, _ext
from fcnkern import backend as _backend
from fcnkern.second_order import register_reference_double_backward

__all__ = ["conv2d_relu", "conv_output_size"]

IMPLEMENTED = ("triton", "cuda", "cpu", "torch")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
IntPair = int | Sequence[int]


def _pair(value: IntPair, what: str) -> tuple[int, int]:
    # The usual forms first (an int, or nn.Conv2d's tuple of two ints): this runs three times per call, and on a GPU
    # a layer's host time is most of a small call (issue 5).
    cls = type(value)
    if cls is int:
        return value, value
    if cls is tuple and len(value) == 2 and type(value[0]) is int and type(value[1]) is int:
        return value
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise TypeError(f"{what} must be an int or a pair of ints, got {value!r}")
    return pair  # type: ignore[return-value]


def _string_padding(
    x: Tensor, weight: Tensor, padding: str, stride: tuple[int, int], dilation: tuple[int, int]
) -> tuple[Tensor, tuple[int, int]]:
    """F.conv2d's ``padding="valid"`` / ``"same"`` as numeric padding: (x, (ph, pw)).

    "same" pads d (k - 1) in total per axis; when that is odd, PyTorch puts the extra zero on the right/bottom, and so
    does this (a one-pixel F.pad of x there, then symmetric padding).
    """
    if padding == "valid":
        return x, (0, 0)
    if padding != "same":
        raise ValueError(f"padding must be 'valid', 'same', an int or a pair of ints, got {padding!r}")
    if stride != (1, 1):
        raise ValueError(f"padding='same' is not supported for strided convolutions (stride {stride})")
    if not isinstance(weight, Tensor) or weight.dim() != 4:
        raise ValueError(f"weight must be a 4-d tensor, got {getattr(weight, 'shape', type(weight).__name__)}")
    total = [dilation[a] * (weight.shape[2 + a] - 1) for a in (0, 1)]
    extra_h, extra_w = total[0] % 2, total[1] % 2
    if extra_h or extra_w:
        x = F.pad(x, (0, extra_w, 0, extra_h))
    return x, (total[0] // 2, total[1] // 2)


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Output length of a convolution along one axis (PyTorch's formula)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _output_hw(x: Tensor, weight: Tensor, stride, padding, dilation) -> tuple[int, int]:
    """(OH, OW) of the convolution of x by weight."""
    (h, w), (r, s) = x.shape[2:], weight.shape[2:]
    return (
        conv_output_size(h, r, stride[0], padding[0], dilation[0]),
        conv_output_size(w, s, stride[1], padding[1], dilation[1]),
    )


def _validate(x, weight, bias, stride, padding, dilation, groups) -> tuple[int, int]:
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, Tensor) or t.dim() != 4:  # an unbatched x was given its batch axis before this
            raise ValueError(f"{name} must be a 4-d tensor, got {getattr(t, 'shape', type(t).__name__)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16 (or float64), got {x.dtype}")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"weight is {weight.dtype} on {weight.device}, x is {x.dtype} on {x.device}")
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    cout, c_per_group = weight.shape[0], weight.shape[1]
    if c_per_group < 1 or cout < 1:  # PyTorch raises for no outputs and gives a wrongly shaped result for no inputs
        raise ValueError(f"weight {tuple(weight.shape)} has no {'input' if c_per_group < 1 else 'output'} channels")
    if x.shape[1] != c_per_group * groups or cout % groups != 0:
        raise ValueError(
            f"weight {tuple(weight.shape)} with groups={groups} does not fit x with {x.shape[1]} channels "
            f"(need C = weight.shape[1] * groups and weight.shape[0] divisible by groups)"
        )
    if bias is not None:
        if not isinstance(bias, Tensor) or bias.shape != (cout,):
            raise ValueError(f"bias must be a vector of {cout}, got {getattr(bias, 'shape', bias)}")
        if bias.dtype != x.dtype or bias.device != x.device:
            raise ValueError(f"bias is {bias.dtype} on {bias.device}, x is {x.dtype} on {x.device}")
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(f"need stride >= 1, dilation >= 1, padding >= 0; got {stride}, {dilation}, {padding}")
    oh, ow = _output_hw(x, weight, stride, padding, dilation)
    if oh < 1 or ow < 1:
        raise ValueError(
            f"input {tuple(x.shape[2:])} padded by {padding} is smaller than the dilated kernel "
            f"{tuple(weight.shape[2:])} (dilation {dilation}): the output would be empty"
        )
    return oh, ow


def _out_like(x: Tensor, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> Tensor:
    fmt = torch._prims_common.suggest_memory_format(x)
    return torch.empty(shape, dtype=dtype or x.dtype, device=x.device).contiguous(memory_format=fmt)


# ---------------------------------------------------------------------------------------------------------------
# Triton backend
# ---------------------------------------------------------------------------------------------------------------


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _acc(dtype: torch.dtype):
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32


def _dot_precision(x: Tensor) -> str:
    """TF32 for fp32 only where PyTorch's own convolutions may use it; bf16 tiles upcast in the CPU interpreter."""
    if x.dtype == torch.bfloat16 and x.device.type == "cpu":
        return "upcast"
    tf32 = x.dtype == torch.float32 and x.is_cuda and torch.backends.cudnn.allow_tf32
    return "tf32" if tf32 else "ieee"


def _geometry_args(stride, padding, dilation) -> tuple[int, ...]:
    return (stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1])


def _channels_last(t: Tensor) -> Tensor:
    """t with the channel stride 1 (a copy unless t is channels_last already): the kernels' reduction axis is the
    channel, so a tile row of channels is one contiguous, vectorisable load (cp.async on sm_80+)."""
    return t.contiguous(memory_format=torch.channels_last)


def _empty_channels_last(shape: tuple[int, ...], like: Tensor) -> Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=torch.channels_last)


def _weight_channels_last(weight: Tensor) -> Tensor:
    """weight (K x C x R x S) viewed over storage laid out K x R x S x C, channel stride 1, for the same reason.

    Dimensions of size 1 get stride 0 (their index is always 0): PyTorch leaves them whatever stride they had, 1 for
    a 1 x 1 kernel's R and S, and a stride of 1 times the kernels' tap index, which they cannot prove is 0, cost the
    weight tile its 16-byte alignment: fc7's bf16 forward loaded it without cp.async, unpipelined, at 255 registers
    with 80-368 bytes of spills (sm_90 / sm_80, ``compile_check --launched``), where stride 0 keeps it like fc6's."""
    w = weight.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    if 1 not in w.shape:
        return w
    return w.as_strided(w.shape, [0 if size == 1 else step for size, step in zip(w.shape, w.stride(), strict=True)])


def _keep_format(result: Tensor, like: Tensor) -> Tensor:
    """result (channels_last from the kernels) in like's memory format, as the op's contract says."""
    fmt = torch._prims_common.suggest_memory_format(like)
    return result if fmt == torch.channels_last else result.contiguous(memory_format=fmt)


# Offsets of every element (and of the masked lanes just past the edges) stay below this in the 32-bit plan.
_INDEX32_LIMIT = 2**31 - 2**24


def _index_type(*tensors: Tensor):
    """tl.int32 for the kernels' pixel and offset arithmetic where every tensor's largest element offset fits (one
    32-bit division where a 64-bit one is a ~70-instruction subroutine, and half the address registers), else
    tl.int64. FCNKERN_TRITON_WIDE_INDEX=1 forces int64, so that tests and timings can reach that plan."""
    import triton.language as tl

    if os.environ.get("FCNKERN_TRITON_WIDE_INDEX") == "1":
        return tl.int64
    fits = all(
        sum((d - 1) * abs(st) for d, st in zip(t.shape, t.stride(), strict=True)) < _INDEX32_LIMIT for t in tensors
    )
    return tl.int32 if fits else tl.int64


@torch.library.custom_op("fcnkern::triton_conv2d_relu", mutates_args=())
def _triton_fwd(
    x: Tensor, weight: Tensor, bias: Tensor | None, stride: list[int], padding: list[int], dilation: list[int],
    groups: int, relu: bool,
) -> Tensor:  # fmt: skip
    from fcnkern.kernels import conv_relu as k

    x_in = x
    n, _, h, w = x.shape
    cout, c_g, r, s = weight.shape
    oh, ow = _output_hw(x, weight, stride, padding, dilation)
    m, k_g = n * oh * ow, cout // groups
    if n * cout * oh * ow == 0:
        return _out_like(x, (n, cout, oh, ow))
    x, weight = _channels_last(x), _weight_channels_last(weight)
    y = _ext.maybe_poison(_empty_channels_last((n, cout, oh, ow), x))
    flat = c_g < k.FLAT_K_BELOW
    bm, bn, bk, warps = k.pick_blocks(k_g, x.element_size())
    bk = k.fwd_block_k(flat, bk, x.element_size())
    if bias is None:  # one kernel variant: a zero bias costs one Cout-vector load per program
        bias = x.new_zeros((cout,))
    grid = (_cdiv(m, bm), _cdiv(k_g, bn), groups)
    k.conv_fwd_kernel[grid](
        x, weight, bias, y,
        m, c_g, h, w, k_g, oh, ow,
        *x.stride(), *weight.stride(), *y.stride(),
        *_geometry_args(stride, padding, dilation),
        r, s, bool(relu), FLAT_K=flat, ACC=_acc(x.dtype), INDEX=_index_type(x, weight, y),
        DOT_PRECISION=_dot_precision(x), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
    )  # fmt: skip
    return _keep_format(y, x_in)


def _triton_dgrad(
    grad: Tensor, y: Tensor, x: Tensor, weight: Tensor, stride: list[int], padding: list[int], dilation: list[int],
    groups: int, relu: bool,
) -> Tensor:  # fmt: skip
    """Gradient with respect to x of the conv (+ ReLU, masked by the saved output y); grad and y channels_last."""
    from fcnkern.kernels import conv_relu as k

    n, _, h, w = x.shape
    cout, c_g, r, s = weight.shape
    oh, ow = y.shape[2:]
    m, k_g = n * h * w, cout // groups
    if x.numel() == 0:
        return _out_like(x, tuple(x.shape))
    weight = _weight_channels_last(weight)
    dx = _ext.maybe_poison(_empty_channels_last(tuple(x.shape), x))
    bm, bn, bk, warps = k.pick_blocks(c_g, x.element_size())
    grid = (_cdiv(m, bm), _cdiv(c_g, bn), groups)
    k.conv_dgrad_kernel[grid](
        grad, y, weight, dx,
        m, c_g, h, w, k_g, oh, ow,
        *grad.stride(), *weight.stride(), *dx.stride(),
        *_geometry_args(stride, padding, dilation),
        r, s, bool(relu), ACC=_acc(x.dtype), INDEX=_index_type(grad, y, weight, dx), DOT_PRECISION=_dot_precision(x),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
    )  # fmt: skip
    return _keep_format(dx, x)


def _wgrad_splits(m: int, programs: int, block_pixels: int, device: torch.device) -> tuple[int, int]:
    """(splits, pixels per split) for a weight gradient's pixel reduction over m pixels: enough splits for the GPU
    to have a few waves of programs (each split costs one weight-sized fp32 partial in the workspace), each a whole
    number of blocks, and at least one split of one block (an empty batch has m = 0). About 8 programs per SM: at
    the 3 resident per SM of the 16-bit kernels that is 2.7 waves, where 4 per SM made 1.45 and Nsight Compute
    put up to half of conv3_2's wgrad time (H200) on the partial wave."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    want = max(1, min(_cdiv(8 * sms, programs), _cdiv(m, 8 * block_pixels), 64))
    per_split = max(1, _cdiv(_cdiv(m, want), block_pixels)) * block_pixels
    return max(1, _cdiv(m, per_split)), per_split


def _triton_wgrad(
    grad: Tensor, y: Tensor, x: Tensor, weight: Tensor, has_bias: bool, stride: list[int], padding: list[int],
    dilation: list[int], groups: int, relu: bool,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Gradients with respect to weight and bias (an empty tensor when there is no bias); grad and y channels_last."""
    from fcnkern.kernels import conv_relu as k

    n, _, h, w = x.shape
    cout, c_g, r, s = weight.shape
    oh, ow = y.shape[2:]
    m, k_g, j = n * oh * ow, cout // groups, c_g * r * s
    bm, bn, bk, warps = k.wgrad_blocks(x.element_size())
    flat = c_g < k.FLAT_K_BELOW
    j_blocks = _cdiv(j, bn) if flat else r * s * _cdiv(c_g, bn)
    programs = _cdiv(k_g, bm) * j_blocks * groups
    splits, per_split = _wgrad_splits(m, programs, bk, x.device)
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    dw_parts = _ext.maybe_poison(torch.empty((splits, groups * k_g, j), dtype=acc_dtype, device=x.device))
    db_parts = _ext.maybe_poison(torch.empty((splits, cout if has_bias else 0), dtype=acc_dtype, device=x.device))
    if m == 0:
        dw_parts.zero_()
        db_parts.zero_()
    else:
        x = _channels_last(x)
        grid = (_cdiv(k_g, bm), j_blocks, splits * groups)
        k.conv_wgrad_kernel[grid](
            grad, y, x, dw_parts, db_parts if has_bias else dw_parts,
            m, c_g, h, w, k_g, oh, ow, groups, per_split,
            *grad.stride(), *x.stride(),
            *_geometry_args(stride, padding, dilation),
            r, s, bool(relu), bool(has_bias), ACC=_acc(x.dtype), INDEX=_index_type(grad, y, x), FLAT_J=flat,
            DOT_PRECISION=_dot_precision(x), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
        )  # fmt: skip
    dw = dw_parts.sum(0)
    if flat:  # columns j = (c, r, s): the weight's own layout
        dw = dw.reshape(weight.shape).to(weight.dtype)
    else:  # j = (r, s, c)
        dw = dw.reshape(cout, r, s, c_g).permute(0, 3, 1, 2).to(weight.dtype, memory_format=torch.contiguous_format)
    return dw, db_parts.sum(0).to(weight.dtype)


@torch.library.custom_op("fcnkern::triton_conv2d_relu_bwd", mutates_args=())
def _triton_bwd(
    grad: Tensor, y: Tensor, x: Tensor, weight: Tensor, stride: list[int], padding: list[int], dilation: list[int],
    groups: int, relu: bool, output_mask: list[bool],
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """(dx, dweight, dbias) as output_mask asks, zero-size where not asked (the C++ op's contract)."""
    need_x, need_w, need_b = output_mask
    grad, y = _channels_last(grad), _channels_last(y)  # once, for both gradient kernels
    # The kernels address y with grad's offsets. Same shape, both channels_last: strides can differ only on
    # dimensions of size 1, where the index is always 0.
    if any(d > 1 and a != b for d, a, b in zip(grad.shape, grad.stride(), y.stride(), strict=True)):
        raise RuntimeError(f"fcnkern: internal: grad {grad.stride()} and y {y.stride()} strides differ")
    dx = _triton_dgrad(grad, y, x, weight, stride, padding, dilation, groups, relu) if need_x else x.new_empty(0)
    dw, db = x.new_empty(0), x.new_empty(0)  # distinct: a custom op's outputs may not alias one another
    if need_w or need_b:
        dw, db = _triton_wgrad(grad, y, x, weight, need_b, stride, padding, dilation, groups, relu)
    return dx, dw if need_w else x.new_empty(0), db


def _fake_fwd(x, weight, bias, stride, padding, dilation, groups, relu):
    oh, ow = _output_hw(x, weight, stride, padding, dilation)
    return _out_like(x, (x.shape[0], weight.shape[0], oh, ow))


def _fake_bwd(grad, y, x, weight, stride, padding, dilation, groups, relu, output_mask):
    need_x, need_w, need_b = output_mask
    dx = _out_like(x, tuple(x.shape)) if need_x else x.new_empty(0)  # a fresh empty each: outputs may not alias
    dw = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_w else x.new_empty(0)
    return dx, dw, weight.new_empty((weight.shape[0],)) if need_b else x.new_empty(0)


def _register_autograd(fwd_name: str, bwd_op) -> None:
    """One autograd formula for the Triton and the C++ forward ops, which share the schema
    (x, weight, bias, stride, padding, dilation, groups, relu) -> y and the backward op's."""

    def setup_context(ctx, inputs, output):
        x, weight, bias, stride, padding, dilation, groups, relu = inputs
        ctx.save_for_backward(x, weight, output)
        ctx.conv = (stride, padding, dilation, groups, relu)
        ctx.has_bias = bias is not None

    def backward(ctx, grad):
        x, weight, y = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        mask = [need_x, need_w, need_b and ctx.has_bias]
        dx, dw, db = _autograd.backward_call(bwd_op, grad, y, x, weight, *ctx.conv, mask)
        return (dx if mask[0] else None, dw if mask[1] else None, db if mask[2] else None,
                None, None, None, None, None)  # fmt: skip

    _autograd.register_autograd(fwd_name, backward, setup_context)


_triton_fwd.register_fake(_fake_fwd)
_triton_bwd.register_fake(_fake_bwd)


def _reference_bwd(grad, y, x, weight, stride, padding, dilation, groups, relu, output_mask):
    """The backward op's (dx, dweight, dbias), all three, in differentiable PyTorch ops (its double backward: see
    fcnkern.second_order); x and weight must require grad."""
    g = torch.where(y <= 0, torch.zeros_like(grad), grad) if relu else grad
    dx, dw = torch.autograd.grad(F.conv2d(x, weight, None, stride, padding, dilation, groups), (x, weight), g,
                                 create_graph=True)  # fmt: skip
    return dx, dw, g.sum((0, 2, 3))


_register_autograd("fcnkern::triton_conv2d_relu", _triton_bwd)
register_reference_double_backward("fcnkern::triton_conv2d_relu_bwd", _reference_bwd)


def _register_cpp_ops() -> None:
    torch.library.register_fake("fcnkern::conv2d_relu")(_fake_fwd)
    torch.library.register_fake("fcnkern::conv2d_relu_bwd")(_fake_bwd)
    _register_autograd("fcnkern::conv2d_relu", torch.ops.fcnkern.conv2d_relu_bwd)
    register_reference_double_backward("fcnkern::conv2d_relu_bwd", _reference_bwd)


_ext.on_load(_register_cpp_ops)


# ---------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------


def conv2d_relu(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    relu: bool = True,
    *,
    backend: str | None = None,
) -> Tensor:
    """``F.relu(F.conv2d(x, weight, bias, stride, padding, dilation, groups))`` (without the ReLU if
    ``relu=False``), forward and backward, on fused kernels.

    Args:
        x: N x C x H x W (or unbatched C x H x W, as F.conv2d takes), float32/float16/bfloat16 (float64 for
            gradchecks), NCHW, channels_last or any strides.
        weight: Cout x C/groups x R x S, x's dtype and device.
        bias: optional Cout vector, x's dtype.
        stride, padding, dilation: ints or (h, w) pairs, as in F.conv2d; padding also "valid" or "same" (stride 1).
        groups: as in F.conv2d.
        relu: apply the ReLU (the default) or not.
        backend: ``"triton"``, ``"cuda"``, ``"cpu"``, ``"torch"`` or None for the current choice (see
            :mod:`fcnkern.backend`).

    Returns:
        N x Cout x OH x OW (Cout x OH x OW for an unbatched x) in x's dtype and memory format. Accumulation is fp32
        (fp64 for fp64). Under ``torch.autocast`` x, weight and bias are cast to its dtype first, as for F.conv2d.
    """
    if isinstance(x, Tensor) and x.dim() == 3:
        y = conv2d_relu(x.unsqueeze(0), weight, bias, stride, padding, dilation, groups, relu, backend=backend)
        return y.squeeze(0)
    x, weight, bias = _amp.cast_for_convolution(x, weight, bias)
    stride_t, dilation_t = _pair(stride, "stride"), _pair(dilation, "dilation")
    if isinstance(padding, str):
        x, padding_t = _string_padding(x, weight, padding, stride_t, dilation_t)
    else:
        padding_t = _pair(padding, "padding")
    _validate(x, weight, bias, stride_t, padding_t, dilation_t, groups)
    be = _backend.resolve(backend, x.device.type, "conv2d_relu", IMPLEMENTED)
    if be == "torch":
        y = F.conv2d(x, weight, bias, stride_t, padding_t, dilation_t, groups)
        return F.relu(y) if relu else y
    args = (x, weight, bias, list(stride_t), list(padding_t), list(dilation_t), groups, relu)
    if be == "triton":
        return _autograd.call("fcnkern::triton_conv2d_relu", *args)
    _ext.load()
    return _autograd.call("fcnkern::conv2d_relu", *args)
