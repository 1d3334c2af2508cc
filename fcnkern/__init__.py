"""fcnkern: fused Triton, CUDA C++ and CPU C++ kernels for Fully Convolutional Networks in PyTorch.

Ops (each with a ``backend=`` argument; see :mod:`fcnkern.backend` for how one is chosen):

- :func:`conv2d_relu`: fused Conv2d + ReLU, forward and backward.
- :func:`pixelwise_cross_entropy`: fused softmax cross-entropy over N x C x H x W logits, FCN's loss.
- :func:`upsample_crop`, :func:`bilinear_upsample_crop`: FCN's upsampling with its crop (learned and fixed
  bilinear).
- :func:`upsample_cross_entropy`: FCN's final bilinear upsampling, crop and loss fused, without full-resolution
  logits.

:mod:`fcnkern.models` has the paper's VGG16 FCN-32s/16s/8s on these layers, each with a pure-PyTorch twin.
:mod:`fcnkern.geometry` derives receptive fields and the FCN crop offsets from a network's layers.
"""

from fcnkern import _ext, geometry, models, nn
from fcnkern._ext import cpu_gemm_library, empty_cache
from fcnkern.backend import (
    BACKENDS,
    BackendInfo,
    BackendUnavailableError,
    backend_info,
    backends,
    use_backend,
)
from fcnkern.conv_relu import conv2d_relu
from fcnkern.convolutionalize import convolutionalize
from fcnkern.cross_entropy import pixelwise_cross_entropy, validate_labels
from fcnkern.models import receptive_field
from fcnkern.upsample import bilinear_kernel, bilinear_upsample_crop, bilinear_weight, upsample_crop
from fcnkern.upsample_ce import upsample_cross_entropy

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendInfo",
    "BackendUnavailableError",
    "__version__",
    "backend_info",
    "backends",
    "bilinear_kernel",
    "bilinear_upsample_crop",
    "bilinear_weight",
    "conv2d_relu",
    "convolutionalize",
    "cpu_gemm_library",
    "empty_cache",
    "geometry",
    "models",
    "nn",
    "pixelwise_cross_entropy",
    "receptive_field",
    "upsample_crop",
    "upsample_cross_entropy",
    "use_backend",
    "validate_labels",
]

# The ahead-of-time build registers torch.ops.fcnkern.* now (cheap); a missing one is compiled only on first use.
_ext.load_prebuilt_quietly()
