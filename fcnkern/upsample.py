"""Transposed-convolution upsampling with the crop folded in: FCN's "deconvolution" layers.

``upsample_crop(x, weight, stride, crop, out_size)`` is the value of
``F.conv_transpose2d(x, weight, bias, stride, groups=groups)[:, :, top:top + H, left:left + W]``, the way FCNs
upsample class scores and then crop them to the input. ``bilinear_upsample_crop`` is the fixed bilinear case
(kernel 2f, stride f, one channel at a time), which needs no weight tensor.

Kernels compute only the kept pixels (gather formulation: each output reads the few input taps that reach it).
Written so far: the CPU C++ kernel of the bilinear path (``cpu``; cpp/upsample_cpu.cpp). The general learned path
and the Triton and CUDA kernels are still to come (issue 4): until then ``torch`` serves them, and naming a backend
without a kernel raises :class:`fcnkern.BackendUnavailableError` rather than silently running PyTorch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fcnkern import _ext
from fcnkern import backend as _backend

__all__ = ["bilinear_kernel", "bilinear_upsample_crop", "bilinear_weight", "upsample_crop"]

# Backends with a kernel for each op.
IMPLEMENTED = {"upsample_crop": ("torch",), "bilinear_upsample_crop": ("cpu", "torch")}
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


def _pair(value: int | Sequence[int], what: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) for v in pair):
        raise TypeError(f"{what} must be an int or a pair of ints, got {value!r}")
    return pair  # type: ignore[return-value]


def _check_window(full: tuple[int, int], crop: tuple[int, int], out_size: tuple[int, int]) -> None:
    if min(crop) < 0:
        raise ValueError(f"crop offsets must be >= 0, got {crop}")
    if min(out_size) < 1:
        raise ValueError(f"out_size must be positive, got {out_size}")
    for axis, full_len, start, length in zip(("height", "width"), full, crop, out_size, strict=True):
        if start + length > full_len:
            raise ValueError(
                f"crop window {start}:{start + length} along {axis} lies outside the upsampled output of {full_len}"
            )


def _check_input(x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"x must be an N x C x h x w tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16 (or float64), got {x.dtype}")


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
        out_size: (H, W) of the kept window, which must lie inside the full (h - 1) * s + k output.
        bias: optional Cout vector.
        groups: as in ConvTranspose2d (Cin for a per-channel layer).
        backend: see :mod:`fcnkern.backend`; only ``torch`` has a kernel so far.

    Returns:
        N x Cout x H x W in x's dtype and memory format.
    """
    _check_input(x)
    if not isinstance(weight, Tensor) or weight.dim() != 4:
        raise ValueError(f"weight must be Cin x Cout/groups x kh x kw, got {getattr(weight, 'shape', weight)}")
    if groups < 1 or x.shape[1] % groups != 0 or weight.shape[0] != x.shape[1]:
        raise ValueError(f"weight {tuple(weight.shape)} and groups={groups} do not fit {x.shape[1]} input channels")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"weight is {weight.dtype} on {weight.device}, x is {x.dtype} on {x.device}")
    if bias is not None and (bias.shape != (weight.shape[1] * groups,) or bias.device != x.device):
        raise ValueError(f"bias must be a vector of {weight.shape[1] * groups} on {x.device}")
    sh, sw = _pair(stride, "stride")
    if min(sh, sw) < 1:
        raise ValueError(f"stride must be >= 1, got {(sh, sw)}")
    crop_t, size_t = _pair(tuple(crop), "crop"), _pair(tuple(out_size), "out_size")
    full = ((x.shape[2] - 1) * sh + weight.shape[2], (x.shape[3] - 1) * sw + weight.shape[3])
    _check_window(full, crop_t, size_t)
    _backend.resolve(backend, x.device.type, "upsample_crop", IMPLEMENTED["upsample_crop"])
    return _crop(F.conv_transpose2d(x, weight, bias, (sh, sw), groups=groups), crop_t, size_t, x)


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
        N x C x H x W in x's dtype and memory format.
    """
    _check_input(x)
    if not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor must be an int >= 1, got {factor!r}")
    k = 2 * factor
    crop_t, size_t = _pair(tuple(crop), "crop"), _pair(tuple(out_size), "out_size")
    _check_window(((x.shape[2] - 1) * factor + k, (x.shape[3] - 1) * factor + k), crop_t, size_t)
    be = _backend.resolve(backend, x.device.type, "bilinear_upsample_crop", IMPLEMENTED["bilinear_upsample_crop"])
    (top, left), (h, w) = crop_t, size_t
    if be == "cpu":
        _ext.load()
        return torch.ops.fcnkern.bilinear_upsample_crop(x, factor, top, left, h, w)
    channels = x.shape[1]
    weight = bilinear_kernel(k, x.dtype).to(x.device).expand(channels, 1, k, k)
    return _crop(F.conv_transpose2d(x, weight, None, factor, groups=channels), crop_t, size_t, x)


def _register_cpp_ops() -> None:
    def fake(t, factor, top, left, h, w):  # both ops: N x C x h x w in t's memory format
        return t.new_empty((t.shape[0], t.shape[1], h, w)).contiguous(
            memory_format=torch._prims_common.suggest_memory_format(t)
        )

    def setup_context(ctx, inputs, output):
        x, factor, top, left, _, _ = inputs
        ctx.geometry = (factor, top, left, x.shape[2], x.shape[3])

    def backward(ctx, grad):
        factor, top, left, h, w = ctx.geometry
        return torch.ops.fcnkern.bilinear_upsample_crop_bwd(grad, factor, top, left, h, w), None, None, None, None, None

    torch.library.register_fake("fcnkern::bilinear_upsample_crop")(fake)
    torch.library.register_fake("fcnkern::bilinear_upsample_crop_bwd")(fake)
    torch.library.register_autograd("fcnkern::bilinear_upsample_crop", backward, setup_context=setup_context)


_ext.on_load(_register_cpp_ops)
