"""``torch.nn`` modules over fcnkern's ops."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fcnkern.cross_entropy import Reduction, pixelwise_cross_entropy

__all__ = ["PixelwiseCrossEntropy"]


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
