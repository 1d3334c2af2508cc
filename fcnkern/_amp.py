"""fcnkern's ops under ``torch.autocast``, as the PyTorch ops they replace behave there.

- ``conv2d_relu``, ``upsample_crop`` and ``bilinear_upsample_crop`` are convolutions (``F.conv2d``,
  ``F.conv_transpose2d``, which autocast runs in its lower-precision dtype): their floating-point inputs other than
  float64 are cast to the autocast dtype first. The cast is differentiable, so float32 parameters get float32
  gradients, as with ``nn.Conv2d``. Without it a layer fed the bf16 output of an autocast ``nn.Conv2d`` would
  raise (its float32 weight is another dtype).
- ``pixelwise_cross_entropy`` and ``upsample_cross_entropy`` are losses (``F.cross_entropy``, which autocast runs
  in float32): they return float32. Their kernels read fp16/bf16 scores as they are and compute in float32 anyway,
  so nothing is cast: the same arithmetic as autocast's float32 copy of the logits, without the copy.

Outside an autocast region (for the inputs' device type) nothing changes.
"""

from __future__ import annotations

import torch
from torch import Tensor

_LOW_PRECISION_OR_FLOAT32 = (torch.float16, torch.bfloat16, torch.float32)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype where autocast is on for ``device_type`` ("cpu", "cuda"), else None."""
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def cast_for_convolution(x: Tensor, *others: Tensor | None) -> tuple:
    """(x, *others) with every fp16/bf16/fp32 tensor cast to the autocast dtype of x's device, where autocast is on
    there; unchanged otherwise (and where x is not a tensor: the op's own checks report that)."""
    tensors = (x, *others)
    if not isinstance(x, Tensor):
        return tensors
    dtype = autocast_dtype(x.device.type)
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if isinstance(t, Tensor) and t.dtype in _LOW_PRECISION_OR_FLOAT32 else t for t in tensors)


def loss_dtype(scores: Tensor) -> torch.dtype:
    """The dtype a loss over ``scores`` returns: float32 under autocast (float64 stays float64), else the scores'."""
    if scores.dtype in _LOW_PRECISION_OR_FLOAT32 and autocast_dtype(scores.device.type) is not None:
        return torch.float32
    return scores.dtype
