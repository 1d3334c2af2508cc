"""Turning a classifier into a fully convolutional net (the FCN paper's "convolutionalization").

A classifier whose head is Linear layers on a flattened C x h x w feature map computes, at its input size, exactly
what a net with the first Linear recast as an h x w convolution and every later Linear as a 1 x 1 convolution
computes. On a larger input the convolutional net slides the classifier over it: every output position is the
classifier's output on the corresponding input patch.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["convolutionalize"]

# Layers applied position-wise: they mean the same on a vector and on a feature map.
_POINTWISE = (nn.ReLU, nn.LeakyReLU, nn.GELU, nn.Sigmoid, nn.Tanh, nn.Dropout, nn.Identity)


def _leaves(module: nn.Module) -> list[nn.Module]:
    """Modules in the order the net applies them, assuming (as VGG-style nets and nn.Sequential do) that forward
    calls its children in the order they were registered."""
    children = list(module.children())
    if not children:
        return [module]
    return [leaf for child in children for leaf in _leaves(child)]


def convolutionalize(module: nn.Module, input_size: tuple[int, int] | int) -> nn.Sequential:
    """A fully convolutional copy of ``module`` (weights copied, not shared).

    Args:
        module: a classifier: convolutional features, optionally an adaptive pooling and a flatten, then Linear layers
            interleaved with position-wise layers (ReLU, Dropout, ...). nn.Sequential or a VGG-style module whose
            forward applies its children in order (flattening between them is allowed).
        input_size: (H, W) the classifier was built for.

    Returns:
        nn.Sequential whose output on an N x C x H x W input of the classifier's size is N x K x 1 x 1 (the
        classifier's K logits), and on a larger input N x K x H' x W'.

    Raises:
        ValueError: if the module has no Linear layer, an adaptive pooling that changes the feature map at
            ``input_size``, or a non-position-wise layer after the first Linear.
    """
    h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
    leaves = _leaves(module)
    first = next((i for i, m in enumerate(leaves) if isinstance(m, nn.Linear)), None)
    if first is None:
        raise ValueError("the module has no Linear layer to convolutionalize")
    features: list[nn.Module] = []
    param = next(module.parameters())
    probe = _probe_input(leaves[:first], h, w, param)
    with torch.no_grad():
        for layer in leaves[:first]:
            if isinstance(layer, nn.Flatten):
                continue
            out = layer(probe)
            if isinstance(layer, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
                if out.shape != probe.shape:
                    raise ValueError(
                        f"{type(layer).__name__} maps {tuple(probe.shape[1:])} to {tuple(out.shape[1:])} at "
                        f"input size {(h, w)}: it would not slide over larger inputs"
                    )
                continue  # the identity at the classifier's size: dropped, so larger maps stay larger
            features.append(copy.deepcopy(layer))
            probe = out
    c, fh, fw = probe.shape[1:]
    head: list[nn.Module] = []
    for layer in leaves[first:]:
        if isinstance(layer, nn.Linear):
            if not head:
                if layer.in_features != c * fh * fw:
                    raise ValueError(
                        f"first Linear expects {layer.in_features} inputs, the features give {c}x{fh}x{fw}"
                    )
                conv = nn.Conv2d(c, layer.out_features, (fh, fw), bias=layer.bias is not None)
                conv.weight.data.copy_(layer.weight.detach().view(layer.out_features, c, fh, fw))
            else:
                conv = nn.Conv2d(layer.in_features, layer.out_features, 1, bias=layer.bias is not None)
                conv.weight.data.copy_(layer.weight.detach()[:, :, None, None])
            if layer.bias is not None:
                conv.bias.data.copy_(layer.bias.detach())
            head.append(conv.to(device=layer.weight.device, dtype=layer.weight.dtype))
        elif isinstance(layer, _POINTWISE):
            head.append(copy.deepcopy(layer))
        else:
            raise ValueError(f"{type(layer).__name__} after the first Linear is not position-wise")
    return nn.Sequential(*features, *head)


def _probe_input(layers: list[nn.Module], h: int, w: int, param: torch.Tensor) -> torch.Tensor:
    first_conv = next((m for m in layers if isinstance(m, nn.Conv2d)), None)
    if first_conv is None:
        raise ValueError("the module has no Conv2d before its first Linear")
    return torch.zeros(1, first_conv.in_channels, h, w, dtype=param.dtype, device=param.device)
