"""Skipping the constant background of FCN's padded feature maps.

conv1_1 pads the image by 100 zeros, so most of its output sees nothing but padding and holds one value per
channel, relu(bias): at 256 x 256, 68% of conv1_1's 454 x 454 pixels. The next layers inherit the pattern: a pixel
whose whole window lies in constant input is constant again, so each early feature map is one per-channel value
everywhere except a box around the image and a thin frame along the map's border (where the layer's own zero
padding enters). Through conv4_x a third to two thirds of every conv's pixels are such background.

:class:`Background` describes that set for one feature map (exactly, as pure geometry of the layers; no value is
inspected). :func:`conv2d_relu` computes a conv layer only on the pixels that vary: the box, the border frame and one
reference pixel for the constant, each a small conv through the layer's own fcnkern op, then fills the rest with
the reference pixel's value. Backward, the same pieces run their own convs' backward: the weight gradient of the
background is the reference pixel's times the summed upstream gradient of the background, and the input gradient
flows through the reference window, which is again background of the layer below. The network computed this way is
the same function of the weights and the image as the dense one, so values and gradients match it to rounding.

:func:`max_pool2d` does the same for a max-pool: it pools the box and the frame and takes the background's value
from one background pixel; :func:`pool2d` is its geometry.

Between tracked layers a map stays in its parts (:class:`Pieces`: the background value and the computed pieces) and
the next layer gathers its windows from them, so a map that is mostly background is never written whole, nor, in the
backward, zeroed and summed whole; :func:`dense` assembles one for a layer that needs it. Shapes are N x C x H x W,
any dtype and memory format the layer's op takes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.utils import _pair

from fcnkern.conv_relu import _out_like, conv_output_size
from fcnkern.conv_relu import conv2d_relu as _conv2d_relu
from fcnkern.geometry import Layer

__all__ = [
    "MIN_CONSTANT_FRACTION",
    "Background",
    "Pieces",
    "Rect",
    "conv2d_relu",
    "conv_background",
    "dense",
    "eligible",
    "image_background",
    "max_pool2d",
    "pool2d",
    "pool_eligible",
]

Rect = tuple[int, int, int, int]  # top, bottom, left, right: rows [top, bottom) x columns [left, right)

# Below this share of constant output pixels a layer is computed densely and tracking stops: the pieces' extra
# small GEMMs and copies would cost about what they save.
MIN_CONSTANT_FRACTION = 0.15
_FAR = 1 << 40  # a frame edge beyond any map: the zero padding outside the map is background (value 0)


@dataclass(frozen=True)
class Background:
    """Where an H x W feature map holds one value per (sample, channel): every pixel inside ``frame`` and outside
    ``box``. A frame reaching past the map means the zero padding around it is background too, so the background
    value is 0 (only the image's own padding, see :func:`image_background`)."""

    height: int
    width: int
    frame: Rect
    box: Rect

    def constant_rects(self) -> list[Rect]:
        """Disjoint rectangles (inside the map) covering exactly the background pixels."""
        f0, f1, g0, g1 = _clip(self.frame, self.height, self.width)
        b0, b1, c0, c1 = _intersect(self.box, (f0, f1, g0, g1))
        if b0 >= b1 or c0 >= c1:
            return _nonempty([(f0, f1, g0, g1)])
        return _nonempty([(f0, b0, g0, g1), (b1, f1, g0, g1), (b0, b1, g0, c0), (b0, b1, c1, g1)])

    def varying_rects(self) -> list[Rect]:
        """Disjoint rectangles covering every pixel that is not background: the border frame and the box."""
        h, w = self.height, self.width
        f0, f1, g0, g1 = _clip(self.frame, h, w)
        border = [(0, f0, 0, w), (f1, h, 0, w), (f0, f1, 0, g0), (f0, f1, g1, w)]
        return _nonempty([*border, _intersect(self.box, (f0, f1, g0, g1))])

    def constant_fraction(self) -> float:
        return _area(self.constant_rects()) / max(1, self.height * self.width)


def _area(rects: list[Rect]) -> int:
    return sum((r[1] - r[0]) * (r[3] - r[2]) for r in rects)


def _clip(rect: Rect, h: int, w: int) -> Rect:
    return _intersect(rect, (0, h, 0, w))


def _intersect(a: Rect, b: Rect) -> Rect:
    return max(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), min(a[3], b[3])


def _has_area(rect: Rect) -> bool:
    return rect[0] < rect[1] and rect[2] < rect[3]


def _nonempty(rects: list[Rect]) -> list[Rect]:
    return [r for r in rects if _has_area(r)]


def image_background(height: int, width: int) -> Background:
    """An image about to be zero-padded: no pixel of it is background, all of the padding is."""
    return Background(height, width, (-_FAR, _FAR, -_FAR, _FAR), (0, height, 0, width))


def _window_span(lo: int, hi: int, kernel: int, stride: int, padding: int) -> tuple[int, int]:
    """The output range [lo', hi') whose windows (kernel, stride, padding) lie inside the input range [lo, hi)."""
    return -((-lo - padding) // stride), (hi + padding - kernel) // stride + 1


def _touch_span(lo: int, hi: int, kernel: int, stride: int, padding: int) -> tuple[int, int]:
    """The output range whose windows meet the input range [lo, hi)."""
    return (lo + padding - kernel) // stride + 1, -((-hi - padding) // stride)


def _propagate(
    bg: Background, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int], out_h: int, out_w: int
) -> Background:
    """The background of a conv or max-pool output: a pixel whose whole window is background is background."""
    f0, f1 = _window_span(bg.frame[0], bg.frame[1], kernel[0], stride[0], padding[0])
    g0, g1 = _window_span(bg.frame[2], bg.frame[3], kernel[1], stride[1], padding[1])
    b0, b1 = _touch_span(bg.box[0], bg.box[1], kernel[0], stride[0], padding[0])
    c0, c1 = _touch_span(bg.box[2], bg.box[3], kernel[1], stride[1], padding[1])
    return Background(out_h, out_w, _clip((f0, f1, g0, g1), out_h, out_w), (b0, b1, c0, c1))


def pool2d(bg: Background, kernel: int, stride: int, out_h: int, out_w: int) -> Background:
    """The background after an unpadded max-pool (floor or ceil mode: a window cut by the map's end reads only
    pixels inside it, so the frame rule holds). The pool itself runs densely."""
    return _propagate(bg, (kernel, kernel), (stride, stride), (0, 0), out_h, out_w)


def conv_background(bg: Background, layer: torch.nn.Module, out_h: int, out_w: int) -> Background:
    """The background of an eligible conv layer's (see :func:`eligible`) out_h x out_w output."""
    return _propagate(bg, tuple(layer.kernel_size), (1, 1), tuple(layer.padding), out_h, out_w)


class _Windows(torch.autograd.Function):
    """Views of x's windows (each rows x columns inside the map); backward adds their gradients into one dx."""

    @staticmethod
    def forward(ctx, x: Tensor, windows: list[Rect]) -> tuple[Tensor, ...]:
        ctx.windows, ctx.shape = windows, x.shape
        ctx.format = torch._prims_common.suggest_memory_format(x)
        return tuple(x[:, :, r0:r1, c0:c1] for r0, r1, c0, c1 in windows)

    @staticmethod
    def backward(ctx, *grads: Tensor | None):
        dx = None
        for (r0, r1, c0, c1), g in zip(ctx.windows, grads, strict=True):
            if g is None:
                continue
            if dx is None:
                dx = g.new_zeros(ctx.shape).contiguous(memory_format=ctx.format)
            dx[:, :, r0:r1, c0:c1] += g
        return dx, None


class _Assemble(torch.autograd.Function):
    """The H x W output from the reference pixel's N x C x 1 x 1 value (filling the background) and the computed
    pieces (written over their rectangles). Backward: each piece gets its rectangle of the gradient, the reference
    value the gradient summed over the background."""

    @staticmethod
    def forward(ctx, value: Tensor, bg: Background, rects: list[Rect], *pieces: Tensor) -> Tensor:
        out = _out_like(pieces[0] if pieces else value, (value.shape[0], value.shape[1], bg.height, bg.width))
        for r0, r1, c0, c1 in bg.constant_rects():
            out[:, :, r0:r1, c0:c1] = value
        for (r0, r1, c0, c1), piece in zip(rects, pieces, strict=True):
            out[:, :, r0:r1, c0:c1] = piece
        ctx.bg, ctx.rects = bg, rects
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        total = torch.zeros(grad.shape[0], grad.shape[1], 1, 1, dtype=torch.float32, device=grad.device)
        for r0, r1, c0, c1 in ctx.bg.constant_rects():
            total += grad[:, :, r0:r1, c0:c1].sum((2, 3), keepdim=True, dtype=torch.float32)
        pieces = tuple(grad[:, :, r0:r1, c0:c1] for r0, r1, c0, c1 in ctx.rects)
        return (total.to(grad.dtype), None, None, *pieces)


@dataclass(frozen=True)
class Pieces:
    """A feature map kept in its parts, never assembled: ``value`` (N x C x 1 x 1) on every background pixel of
    ``bg`` and ``pieces[i]`` on ``rects[i]`` (``bg.varying_rects()``)."""

    value: Tensor
    bg: Background
    rects: tuple[Rect, ...]
    pieces: tuple[Tensor, ...]

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.value.shape[:2], self.bg.height, self.bg.width))

    def dense(self) -> Tensor:
        return _Assemble.apply(self.value, self.bg, list(self.rects), *self.pieces)


def dense(h: Tensor | Pieces) -> Tensor:
    """The map as one tensor (a tensor is returned as it is)."""
    return h.dense() if isinstance(h, Pieces) else h


def _at(rect: Rect, origin: Rect) -> tuple[slice, ...]:
    """The index of rect's pixels in an N x C map whose top-left pixel is origin's."""
    rows, cols = slice(rect[0] - origin[0], rect[1] - origin[0]), slice(rect[2] - origin[2], rect[3] - origin[2])
    return slice(None), slice(None), rows, cols


class _Gather(torch.autograd.Function):
    """Windows of a map held as :class:`Pieces`, each a dense tensor: ``spans``, rectangles inside the map.
    Backward: each piece gets its pixels' gradients summed over the windows, the value the gradient summed over every
    window's background pixels. Assembling the map instead (the main job's conv1_x outputs: 8 x 8 x 262^2, 90 %
    background) cost a full write forward and a zero-fill and a full read backward: without them the main job's
    step ran 1.04x faster, FCN-8s's at 256^2 1.07x (in-process A/B)."""

    @staticmethod
    def forward(ctx, value: Tensor, bg: Background, rects: list[Rect], spans: list[Rect], *pieces: Tensor):
        like = pieces[0] if pieces else value
        n, c = value.shape[:2]
        constant = bg.constant_rects()
        windows = []
        for span in spans:
            out = _out_like(like, (n, c, span[1] - span[0], span[3] - span[2]))
            for rect in _nonempty([_intersect(r, span) for r in constant]):
                out[_at(rect, span)] = value
            for rect, piece in zip(rects, pieces, strict=True):
                part = _intersect(rect, span)
                if _has_area(part):
                    out[_at(part, span)] = piece[_at(part, rect)]
            windows.append(out)
        ctx.bg, ctx.rects, ctx.spans = bg, rects, spans
        ctx.value_dtype, ctx.piece_shapes = value.dtype, [p.shape for p in pieces]
        return tuple(windows)

    @staticmethod
    def backward(ctx, *grads: Tensor | None):
        bg, rects = ctx.bg, ctx.rects
        constant = bg.constant_rects()
        total, piece_grads = None, [None] * len(rects)
        for span, g in zip(ctx.spans, grads, strict=True):
            if g is None:
                continue
            for rect in _nonempty([_intersect(r, span) for r in constant]):
                part = g[_at(rect, span)].sum((2, 3), keepdim=True, dtype=torch.float32)
                total = part if total is None else total + part
            for i, rect in enumerate(rects):
                part = _intersect(rect, span)
                if _has_area(part):
                    if piece_grads[i] is None:
                        piece_grads[i] = g.new_zeros(ctx.piece_shapes[i])
                    piece_grads[i][_at(part, rect)] += g[_at(part, span)]
        dvalue = None if total is None else total.to(ctx.value_dtype)
        return (dvalue, None, None, None, *piece_grads)


def eligible(layer: torch.nn.Module) -> bool:
    """Whether a Conv2dReLU-like layer can skip background: stride 1, dilation 1, zero padding (any groups)."""
    return (
        tuple(layer.stride) == (1, 1)
        and tuple(layer.dilation) == (1, 1)
        and layer.padding_mode == "zeros"
        and not isinstance(layer.padding, str)
    )


def _check_size(x: Tensor | Pieces, bg: Background) -> None:
    if (x.shape[2], x.shape[3]) != (bg.height, bg.width):
        raise ValueError(f"background is for {bg.height} x {bg.width} maps, x is {tuple(x.shape)}")
    if isinstance(x, Pieces) and x.bg != bg:
        raise ValueError(f"x's pieces are laid out for {x.bg}, not for {bg}")


def _window_reads(x: Tensor | Pieces, spans: list[Rect]) -> list[Tensor | None]:
    """x over the input spans clipped to the map: views of a tensor, through one _Windows so that their gradients
    add into one dx, or windows gathered from Pieces; None for a span wholly outside the map."""
    inside = [_clip(s, x.shape[2], x.shape[3]) for s in spans]
    keep = [i for i, r in enumerate(inside) if _has_area(r)]
    if isinstance(x, Pieces):
        reads = _Gather.apply(x.value, x.bg, list(x.rects), [inside[i] for i in keep], *x.pieces)
    else:
        reads = _Windows.apply(x, [inside[i] for i in keep])
    views = dict(zip(keep, reads, strict=True))
    return [views.get(i) for i in range(len(spans))]


def max_pool2d(x: Tensor | Pieces, bg: Background, layer: torch.nn.MaxPool2d) -> tuple[Tensor | Pieces, Background]:
    """``layer(x)`` for a max-pool that :func:`pool_eligible` accepts and x's background ``bg``, pooling only the
    output pixels that are not background; the rest take the value of one background pixel of x (the max of a
    window of one value). Returns the output, as :class:`Pieces` where it has background, and its background.

    Backward, each pooled piece routes its gradient to its windows' maxima as the dense pool does (same windows, same
    first-maximum rule); the background's gradient, summed, goes to that one pixel of x, which is background of the
    layer below, whose own backward sums its background's gradient anyway: the same weight and image gradients as
    the dense pool, which reads and writes every pixel of the largest maps in the network (conv1_2's output)."""
    _check_size(x, bg)
    if not pool_eligible(layer):
        raise ValueError(f"{layer} cannot skip background: it needs no padding, dilation 1 and no indices")
    (kh, kw), (sh, sw) = _pair(layer.kernel_size), _pair(layer.stride or layer.kernel_size)
    out_h, out_w = (
        Layer("pool", "pool", k, s, ceil_mode=layer.ceil_mode).out_size(n)
        for k, s, n in ((kh, sh, x.shape[2]), (kw, sw, x.shape[3]))
    )
    if out_h <= 0 or out_w <= 0:
        return layer(dense(x)), bg  # PyTorch's error for a map smaller than the window
    out_bg = _propagate(bg, (kh, kw), (sh, sw), (0, 0), out_h, out_w)
    constant = out_bg.constant_rects()
    if _area(constant) < MIN_CONSTANT_FRACTION * out_h * out_w:
        return layer(dense(x)), out_bg
    r, c = constant[0][0] * sh, constant[0][2] * sw  # a pixel of the reference output's window: background
    rects = out_bg.varying_rects()
    spans = [(r, r + 1, c, c + 1)]
    spans += [(r0 * sh, (r1 - 1) * sh + kh, c0 * sw, (c1 - 1) * sw + kw) for r0, r1, c0, c1 in rects]
    if isinstance(x, Pieces):  # the reference pixel holds x's own background value
        value, windows = x.value, _window_reads(x, spans[1:])
    else:
        value, *windows = _window_reads(x, spans)
    pieces = [F.max_pool2d(w, (kh, kw), (sh, sw), ceil_mode=layer.ceil_mode) for w in windows]
    for rect, piece in zip(rects, pieces, strict=True):
        # A window cut by the map's end pools to the same rows as the dense pool's last ones (ceil mode's rule is
        # relative to the map's end, which the window shares).
        if piece.shape[2:] != (rect[1] - rect[0], rect[3] - rect[2]):
            raise RuntimeError(f"max-pool piece {tuple(piece.shape)} does not fill {rect}: a fcnkern bug")
    return Pieces(value, out_bg, tuple(rects), tuple(pieces)), out_bg


def pool_eligible(layer: torch.nn.Module) -> bool:
    """Whether a max-pool can skip background: nn.MaxPool2d without padding, dilation or returned indices."""
    return (
        isinstance(layer, torch.nn.MaxPool2d)
        and _pair(layer.padding) == (0, 0)
        and _pair(layer.dilation) == (1, 1)
        and not layer.return_indices
    )


def conv2d_relu(
    x: Tensor | Pieces, bg: Background, layer: torch.nn.Module
) -> tuple[Tensor | Pieces, Background | None]:
    """``layer(x)`` for an fcnkern Conv2dReLU layer (see :func:`eligible`) and x's background ``bg``, computing only
    the output pixels that are not background. Returns the output as :class:`Pieces` and its background, or a tensor
    and None where too little of it is background to be worth tracking (the layer then ran densely)."""
    _check_size(x, bg)
    (kh, kw), (ph, pw) = layer.kernel_size, layer.padding
    out_h, out_w = conv_output_size(x.shape[2], kh, 1, ph, 1), conv_output_size(x.shape[3], kw, 1, pw, 1)
    if out_h <= 0 or out_w <= 0:
        return layer(dense(x)), None
    out_bg = conv_background(bg, layer, out_h, out_w)
    constant = out_bg.constant_rects()
    if _area(constant) < MIN_CONSTANT_FRACTION * out_h * out_w:
        return layer(dense(x)), None
    ref = constant[0][0], constant[0][0] + 1, constant[0][2], constant[0][2] + 1
    rects = out_bg.varying_rects()
    # Each output rectangle reads rows [r0 - ph, r1 - ph + kh - 1) of x; the part outside x is zero padding.
    spans = [(r0 - ph, r1 - ph + kh - 1, c0 - pw, c1 - pw + kw - 1) for r0, r1, c0, c1 in [ref, *rects]]
    pieces = []
    for span, view in zip(spans, _window_reads(x, spans), strict=True):
        if view is not None:
            clipped = _clip(span, x.shape[2], x.shape[3])
            pad = (clipped[2] - span[2], span[3] - clipped[3], clipped[0] - span[0], span[1] - clipped[1])
            window = F.pad(view, pad) if any(pad) else view
        else:  # wholly in the padding: the reference window of conv1_1
            window = layer.weight.new_zeros(x.shape[0], x.shape[1], span[1] - span[0], span[3] - span[2])
        pieces.append(
            _conv2d_relu(window, layer.weight, layer.bias, 1, 0, 1, layer.groups, layer.relu, backend=layer.backend)
        )
    return Pieces(pieces[0], out_bg, tuple(rects), tuple(pieces[1:])), out_bg
