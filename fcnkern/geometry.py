"""Coordinate geometry of fully convolutional nets: receptive fields and crop offsets from the layer list.

The FCN paper's transformation rule: a layer with kernel k and stride s after one with k', s' acts as one layer with
kernel k' + (k - 1)s' and stride ss'. Equivalently (as Caffe's ``coord_map`` does), every layer maps its output
coordinate to its input coordinate affinely, x_in = a * x_out + b, taking the centre of the window:

- convolution / pooling (kernel k, stride s, padding p, dilation d): a = s, b = d(k - 1)/2 - p;
- transposed convolution ("deconvolution"): the inverse map, a = 1/s, b = (p - (k - 1)/2) / s.

Composing the maps along a path from the network input gives every blob's map to input coordinates. Two blobs with
the same scale a line up after cropping the larger by (b_ref - b_src) / a pixels: the FCN skip and upsampling
crops (FCN-32s: 19; FCN-16s: 5 and 27; FCN-8s: 5, 9 and 31) are derived from the layers, not written as constants.
Exact rational arithmetic throughout (half-pixel centres are common).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

__all__ = [
    "FCN_VARIANTS",
    "VGG16_FCN_TRUNK",
    "Affine",
    "Layer",
    "coord_map",
    "crop_offset",
    "fcn_crops",
    "output_size",
    "receptive_field",
]


@dataclass(frozen=True)
class Affine:
    """x_in = scale * x_out + shift."""

    scale: Fraction
    shift: Fraction

    def then(self, inner: Affine) -> Affine:
        """The map of this layer followed (towards the input) by ``inner``: inner(self(x))."""
        return Affine(inner.scale * self.scale, inner.scale * self.shift + inner.shift)


IDENTITY = Affine(Fraction(1), Fraction(0))


@dataclass(frozen=True)
class Layer:
    """One spatial layer: kind is "conv", "pool" or "deconv" (transposed convolution)."""

    name: str
    kind: str
    kernel: int
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    ceil_mode: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("conv", "pool", "deconv"):
            raise ValueError(f"layer {self.name}: kind must be conv, pool or deconv, got {self.kind!r}")
        if self.kernel < 1 or self.stride < 1 or self.padding < 0 or self.dilation < 1:
            raise ValueError(f"layer {self.name}: kernel, stride, dilation must be >= 1 and padding >= 0")

    @property
    def extent(self) -> int:
        """Input pixels spanned by one window: d(k - 1) + 1."""
        return self.dilation * (self.kernel - 1) + 1

    def coord_map(self) -> Affine:
        """Output coordinate -> input coordinate (window centre)."""
        half = Fraction(self.extent - 1, 2)
        if self.kind == "deconv":
            return Affine(Fraction(1, self.stride), (self.padding - half) / self.stride)
        return Affine(Fraction(self.stride), half - self.padding)

    def out_size(self, n: int) -> int:
        """Output length for input length n, as PyTorch computes it (0 where the input is too small)."""
        if self.kind == "deconv":
            return (n - 1) * self.stride - 2 * self.padding + self.extent
        span = n + 2 * self.padding - self.extent
        if self.kind == "pool" and self.ceil_mode:
            # A ceil-mode window may run past the map's end, even a map shorter than the window (2 pixels under a
            # 3-wide window give one output); PyTorch drops a last window that would start in the right padding.
            out = math.ceil(span / self.stride) + 1
            if (out - 1) * self.stride >= n + self.padding:
                out -= 1
            return max(out, 0)
        if span < 0:
            return 0
        return span // self.stride + 1


def coord_map(path: Sequence[Layer]) -> Affine:
    """Map from the coordinates of the blob at the end of ``path`` (layers from the input on) to input coordinates."""
    m = IDENTITY
    for layer in path:
        m = layer.coord_map().then(m)
    return m


def output_size(path: Sequence[Layer], n: int) -> int:
    """Length of the blob at the end of ``path`` for an input of length n."""
    for layer in path:
        n = layer.out_size(n)
    return n


def crop_offset(source: Sequence[Layer], reference: Sequence[Layer]) -> int:
    """Pixels to crop from the start of the blob at the end of ``source`` so that it lines up with the blob at the
    end of ``reference`` (both paths start at the network input). Raises if they cannot be aligned by a crop."""
    src, ref = coord_map(source), coord_map(reference)
    if src.scale != ref.scale:
        raise ValueError(f"blobs at different scales ({src.scale} vs {ref.scale}) cannot be aligned by cropping")
    offset = (ref.shift - src.shift) / src.scale
    if offset.denominator != 1 or offset < 0:
        raise ValueError(f"alignment needs a crop of {offset} pixels, which is not a non-negative integer")
    return int(offset)


@dataclass(frozen=True)
class FieldInfo:
    """Receptive field of a blob in input pixels: its size, the jump between neighbouring outputs, and the input
    coordinate of output 0's centre."""

    name: str
    size: Fraction
    jump: Fraction
    start: Fraction


def receptive_field(path: Sequence[Layer]) -> list[FieldInfo]:
    """Receptive field, jump and start after every layer of ``path`` (the paper's rule: kernel k after a net of jump
    j grows the field by (k - 1) j; transposed convolutions divide the jump)."""
    size, out = Fraction(1), []
    for i, layer in enumerate(path):
        before = coord_map(path[:i])
        if layer.kind == "deconv":
            # Each output of a stride-s transposed conv sees ceil(k / s) inputs' worth of field, minus one jump.
            taps = math.ceil(layer.kernel / layer.stride)
            size = size + (taps - 1) * before.scale
        else:
            size = size + (layer.extent - 1) * before.scale
        m = coord_map(path[: i + 1])
        out.append(FieldInfo(layer.name, size, m.scale, m.shift))
    return out


def _vgg16_trunk() -> list[Layer]:
    layers = [Layer("conv1_1", "conv", 3, padding=100), Layer("conv1_2", "conv", 3, padding=1)]
    layers.append(Layer("pool1", "pool", 2, 2, ceil_mode=True))
    for block, count in ((2, 2), (3, 3), (4, 3), (5, 3)):
        layers += [Layer(f"conv{block}_{i}", "conv", 3, padding=1) for i in range(1, count + 1)]
        layers.append(Layer(f"pool{block}", "pool", 2, 2, ceil_mode=True))
    layers += [Layer("fc6", "conv", 7), Layer("fc7", "conv", 1), Layer("score_fr", "conv", 1)]
    return layers


# VGG16 as the FCN paper uses it: conv1_1 padded by 100, ceil-mode pooling, fc6 as a 7x7 conv, fc7 and score 1x1.
VGG16_FCN_TRUNK: tuple[Layer, ...] = tuple(_vgg16_trunk())


def _upto(name: str) -> list[Layer]:
    names = [layer.name for layer in VGG16_FCN_TRUNK]
    return list(VGG16_FCN_TRUNK[: names.index(name) + 1])


def _score(pool: str) -> list[Layer]:
    return [*_upto(pool), Layer(f"score_{pool}", "conv", 1)]


def _paths(variant: str) -> dict[str, tuple[list[Layer], list[Layer]]]:
    """(source, reference) paths of every crop in an FCN variant, named by the cropped blob."""
    fr = _upto("score_fr")
    if variant == "fcn32s":
        return {"upscore": ([*fr, Layer("upscore", "deconv", 64, 32)], [])}
    up2 = [*fr, Layer("upscore2", "deconv", 4, 2)]
    if variant == "fcn16s":
        # After the fuse, upscore2 and the cropped score_pool4 share upscore2's coordinates.
        return {
            "score_pool4": (_score("pool4"), up2),
            "upscore16": ([*up2, Layer("upscore16", "deconv", 32, 16)], []),
        }
    if variant == "fcn8s":
        up_pool4 = [*up2, Layer("upscore_pool4", "deconv", 4, 2)]
        return {
            "score_pool4": (_score("pool4"), up2),
            "score_pool3": (_score("pool3"), up_pool4),
            "upscore8": ([*up_pool4, Layer("upscore8", "deconv", 16, 8)], []),
        }
    raise ValueError(f"unknown FCN variant {variant!r}; choose one of {', '.join(FCN_VARIANTS)}")


FCN_VARIANTS = ("fcn32s", "fcn16s", "fcn8s")


def fcn_crops(variant: str) -> dict[str, int]:
    """Crop offset of every skip and upsampling blob of an FCN variant, derived from the layers."""
    return {name: crop_offset(src, ref) for name, (src, ref) in _paths(variant).items()}


def fcn_crop_fits(variant: str, size: int) -> dict[str, tuple[int, int, int]]:
    """For an input of length ``size``: each crop's (offset, source length, reference length). The crop lands inside
    the source when offset + reference length <= source length."""
    return {
        name: (crop_offset(src, ref), output_size(src, size), output_size(ref, size) if ref else size)
        for name, (src, ref) in _paths(variant).items()
    }
