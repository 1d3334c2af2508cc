"""``torch.nn`` modules over fcnkern's ops."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fcnkern.conv_relu import conv2d_relu
from fcnkern.cross_entropy import Reduction, pixelwise_cross_entropy
from fcnkern.upsample import bilinear_upsample_crop, bilinear_weight, upsample_crop
from fcnkern.upsample_ce import upsample_cross_entropy

__all__ = ["Conv2dReLU", "PixelwiseCrossEntropy", "UpsampleCrop", "UpsampleCrossEntropy"]


class Conv2dReLU(nn.Conv2d):
    """``nn.Conv2d`` followed by ReLU, on :func:`fcnkern.conv2d_relu`'s fused kernels (``relu=False``: the plain
    conv through the same kernels, as FCN's score layers use).

    Same constructor, parameters and state_dict keys (``weight``, ``bias``) as ``nn.Conv2d``, so weights load from
    one; :meth:`from_conv` wraps an existing layer. Every padding and ``padding_mode`` of nn.Conv2d: a mode other
    than "zeros" pads x with F.pad first and convolves unpadded, as nn.Conv2d itself does.
    """

    def __init__(self, *args, relu: bool = True, backend: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.relu, self.backend = relu, backend

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, relu: bool = True, backend: str | None = None) -> Conv2dReLU:
        """A Conv2dReLU with ``conv``'s geometry that shares ``conv``'s parameters."""
        layer = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            conv.groups, conv.bias is not None, conv.padding_mode, relu=relu, backend=backend,
            device=conv.weight.device, dtype=conv.weight.dtype,
        )  # fmt: skip
        layer.weight, layer.bias = conv.weight, conv.bias
        return layer

    def forward(self, x: Tensor) -> Tensor:
        padding = self.padding
        if self.padding_mode != "zeros":
            x, padding = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode), 0
        return conv2d_relu(
            x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups, self.relu,
            backend=self.backend,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, relu={self.relu}, backend={self.backend!r}"


class PixelwiseCrossEntropy(nn.Module):
    """Module form of :func:`fcnkern.pixelwise_cross_entropy`: logits N x C x H x W, target N x H x W int64.

    The class weight, if any, is a buffer (it moves with ``.to()`` and is saved in the state_dict), like
    ``nn.CrossEntropyLoss``'s.
    """

    weight: Tensor | None

    def __init__(
        self,
        weight: Tensor | None = None,
        ignore_index: int = 255,
        reduction: Reduction = "sum",
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.register_buffer("weight", None if weight is None else torch.as_tensor(weight, dtype=torch.float32))
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.backend = backend

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return pixelwise_cross_entropy(
            logits, target, self.weight, self.ignore_index, self.reduction, backend=self.backend
        )

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, backend={self.backend!r}"


class UpsampleCrossEntropy(PixelwiseCrossEntropy):
    """Module form of :func:`fcnkern.upsample_cross_entropy`, FCN's fused final layer and loss: scores
    N x C x h x w upsampled bilinearly by ``factor``, cropped at ``crop`` to the target's N x H x W, and scored
    with softmax cross-entropy, without full-resolution logits. Weight, ignore_index and reduction as in
    :class:`PixelwiseCrossEntropy`."""

    def __init__(
        self,
        factor: int,
        crop: tuple[int, int],
        weight: Tensor | None = None,
        ignore_index: int = 255,
        reduction: Reduction = "sum",
        backend: str | None = None,
    ) -> None:
        super().__init__(weight, ignore_index, reduction, backend)
        self.factor, self.crop = factor, tuple(crop)

    def forward(self, scores: Tensor, target: Tensor) -> Tensor:  # type: ignore[override]
        return upsample_cross_entropy(
            scores, target, self.factor, self.crop, self.weight, self.ignore_index, self.reduction,
            backend=self.backend,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return f"factor={self.factor}, crop={self.crop}, " + super().extra_repr()


def add_bilinear_weight(module: nn.Module, channels: int, factor: int, learnable: bool) -> None:
    """Give ``module`` the ``weight`` of ``nn.ConvTranspose2d(channels, channels, 2 * factor, factor)`` initialised
    to the diagonal bilinear kernel: a parameter when learnable, else a buffer (the state_dict key is ``weight``
    either way)."""
    weight = bilinear_weight(channels, 2 * factor)
    if learnable:
        module.weight = nn.Parameter(weight)
    else:
        module.register_buffer("weight", weight)


class UpsampleCrop(nn.Module):
    """FCN's upsampling layer with its crop: ``forward(x, crop, out_size)`` upsamples N x C x h x w by ``factor``
    (kernel 2 * factor) and keeps the ``out_size`` window at ``crop``.

    The state_dict is that of ``nn.ConvTranspose2d(channels, channels, 2 * factor, factor, bias=False)``: one
    ``weight`` of C x C x 2f x 2f, initialised to the diagonal bilinear kernel as the FCN reference does, so weights
    load from and into such a layer. ``learnable=True`` makes it a parameter, computed in full (any weight);
    ``learnable=False`` keeps it as a buffer that must stay bilinear and uses the per-channel bilinear path.
    """

    weight: Tensor

    def __init__(self, channels: int, factor: int, learnable: bool = True, backend: str | None = None) -> None:
        super().__init__()
        if channels < 1 or factor < 1:
            raise ValueError(f"channels and factor must be >= 1, got {channels} and {factor}")
        self.channels, self.factor, self.learnable, self.backend = channels, factor, learnable, backend
        add_bilinear_weight(self, channels, factor, learnable)

    def forward(self, x: Tensor, crop: tuple[int, int], out_size: tuple[int, int]) -> Tensor:
        if self.learnable:
            return upsample_crop(x, self.weight, self.factor, crop, out_size, backend=self.backend)
        return bilinear_upsample_crop(x, self.factor, crop, out_size, backend=self.backend)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if not self.learnable:
            expected = bilinear_weight(self.channels, 2 * self.factor, self.weight.dtype).to(self.weight.device)
            if not torch.equal(self.weight, expected):
                raise ValueError(
                    f"{prefix}weight is not the bilinear kernel, but this UpsampleCrop is fixed (learnable=False): "
                    "load it into a learnable layer instead"
                )

    def extra_repr(self) -> str:
        return f"channels={self.channels}, factor={self.factor}, learnable={self.learnable}, backend={self.backend!r}"
