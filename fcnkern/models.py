"""The paper's networks: VGG16 FCN-32s, FCN-16s and FCN-8s, on fcnkern's layers, each with a pure-PyTorch twin.

``fcn32s / fcn16s / fcn8s(num_classes=21)`` build the reference architecture: VGG16's conv blocks (conv1_1 padded
by 100, ceil-mode max-pooling), fc6 as a 7x7 conv with 4096 outputs, fc7 as a 1x1 conv, dropout, score_fr, the
skip scores score_pool4 / score_pool3 (optionally with the "at-once" variant's 0.01 / 0.0001 input scaling),
learnable 2x upsampling initialised bilinear, fixed bilinear final upsampling, and crops. Every crop offset comes
from :mod:`fcnkern.geometry` (the network's own layer list), not from constants.

``twin=True`` builds the same network from plain PyTorch (nn.Conv2d + nn.ReLU, ConvTranspose2d + slicing) with the
same state_dict keys: loading one's weights into the other gives the same outputs and gradients.

``model(x, target)`` (or ``model.loss(x, target)``) returns the training loss instead of the scores: on the fcnkern
network through the fused head (:func:`fcnkern.upsample_cross_entropy`: the final bilinear upsampling, crop and
softmax cross-entropy without full-resolution logits), on the twin as F.cross_entropy of its output.

``width`` scales every channel count (VGG16's 64..512 and fc6/fc7's 4096) for small, fast models (the CLI's
synthetic default); 1.0 is the paper's network.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fcnkern import background, conv_relu, geometry, upsample_ce
from fcnkern import upsample as upsample_ops
from fcnkern.cross_entropy import Reduction
from fcnkern.nn import Conv2dReLU, UpsampleCrop, add_bilinear_weight

__all__ = [
    "FCN",
    "fcn8s",
    "fcn16s",
    "fcn32s",
    "init_from",
    "receptive_field",
    "vgg16_backbone_from_state_dict",
]

# (block, convs, channels) of VGG16.
VGG16_BLOCKS = ((1, 2, 64), (2, 2, 128), (3, 3, 256), (4, 3, 512), (5, 3, 512))
FC_CHANNELS = 4096
# The "at-once" FCN variants scale the skip inputs so that their scores start small (paper, section 4.2).
AT_ONCE_SCALE = {"pool4": 0.01, "pool3": 0.0001}
# Final upsampling layer of each variant: (name, factor).
FINAL_UPSAMPLE = {"fcn32s": ("upscore", 32), "fcn16s": ("upscore16", 16), "fcn8s": ("upscore8", 8)}


def _backend_for(requested: str | None, implemented: tuple[str, ...]) -> str | None:
    """The requested backend where the op has a kernel on it, else the torch reference (until it does)."""
    return requested if requested is None or requested in implemented else "torch"


def _channels(c: int, width: float) -> int:
    return max(1, round(c * width))


class _TorchConv(nn.Conv2d):
    """The twin's conv layer: nn.Conv2d then nn.ReLU (or not), same state_dict keys as Conv2dReLU."""

    def __init__(self, *args, relu: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.relu = relu

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x)
        return F.relu(y) if self.relu else y


class _TorchUpsample(nn.Module):
    """The twin's upsampling: ConvTranspose2d with a diagonal bilinear initial weight, then slicing. Same state_dict
    as UpsampleCrop (a parameter when learnable, else a buffer)."""

    weight: Tensor

    def __init__(self, channels: int, factor: int, learnable: bool = True) -> None:
        super().__init__()
        self.factor = factor
        add_bilinear_weight(self, channels, factor, learnable)

    def forward(self, x: Tensor, crop: tuple[int, int], out_size: tuple[int, int]) -> Tensor:
        full = F.conv_transpose2d(x, self.weight.to(x.dtype), stride=self.factor)
        return full[:, :, crop[0] : crop[0] + out_size[0], crop[1] : crop[1] + out_size[1]]


class FCN(nn.Module):
    """VGG16 FCN (``variant`` fcn32s, fcn16s or fcn8s). ``forward(x)``: N x 3 x H x W images (any H, W >= 1) to
    N x num_classes x H x W class scores.

    Args:
        variant: which skip architecture.
        num_classes: output classes (21 for PASCAL VOC).
        backend: fcnkern backend for every layer (None: automatic); ignored by the twin. A layer whose op has no
            kernel on that backend yet runs on ``torch`` (see :meth:`layer_backends`).
        twin: build the pure-PyTorch twin instead of the fcnkern network.
        at_once: scale the skip inputs by 0.01 (pool4) and 0.0001 (pool3), as the "at-once" variants do.
        width: channel multiplier (1.0: the paper's VGG16).
        dropout: dropout probability after fc6 and fc7 (0.5 in the paper).
        skip_background: compute the early conv layers only where their maps are not the constant background that
            conv1_1's padding of 100 makes (:mod:`fcnkern.background`; same function, a third less arithmetic at
            256 x 256). None: on for CPU inputs, off on the GPU, where the extra small launches cost more than they
            save at batch 1 (not yet measured there). Ignored by the twin, which stays the plain reference.
    """

    def __init__(
        self,
        variant: str = "fcn8s",
        num_classes: int = 21,
        backend: str | None = None,
        twin: bool = False,
        at_once: bool = False,
        width: float = 1.0,
        dropout: float = 0.5,
        skip_background: bool | None = None,
    ) -> None:
        super().__init__()
        if variant not in geometry.FCN_VARIANTS:
            raise ValueError(f"unknown FCN variant {variant!r}; choose one of {', '.join(geometry.FCN_VARIANTS)}")
        if num_classes < 1 or width <= 0:
            raise ValueError(f"num_classes must be >= 1 and width > 0, got {num_classes} and {width}")
        self.variant, self.num_classes, self.twin, self.at_once = variant, num_classes, twin, at_once
        self.backend, self.skip_background, self.width = backend, skip_background, width
        self.crops = geometry.fcn_crops(variant)

        def conv(cin: int, cout: int, k: int, padding: int = 0, relu: bool = True) -> nn.Module:
            if twin:
                return _TorchConv(cin, cout, k, padding=padding, relu=relu)
            be = _backend_for(backend, conv_relu.IMPLEMENTED)
            return Conv2dReLU(cin, cout, k, padding=padding, relu=relu, backend=be)

        def upsample(factor: int, learnable: bool) -> nn.Module:
            if twin:
                return _TorchUpsample(num_classes, factor, learnable)
            op = "upsample_crop" if learnable else "bilinear_upsample_crop"
            be = _backend_for(backend, upsample_ops.IMPLEMENTED[op])
            return UpsampleCrop(num_classes, factor, learnable=learnable, backend=be)

        cin = 3
        self.features = nn.ModuleDict()
        for block, count, channels in VGG16_BLOCKS:
            cout = _channels(channels, width)
            for i in range(1, count + 1):
                self.features[f"conv{block}_{i}"] = conv(cin, cout, 3, padding=100 if cin == 3 else 1)
                cin = cout
            self.features[f"pool{block}"] = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.pool_channels = {f"pool{b}": _channels(c, width) for b, _, c in VGG16_BLOCKS}
        fc = _channels(FC_CHANNELS, width)
        self.fc6 = conv(cin, fc, 7)
        self.drop6 = nn.Dropout2d(dropout)
        self.fc7 = conv(fc, fc, 1)
        self.drop7 = nn.Dropout2d(dropout)
        self.score_fr = conv(fc, num_classes, 1, relu=False)
        if variant in ("fcn16s", "fcn8s"):
            self.score_pool4 = conv(self.pool_channels["pool4"], num_classes, 1, relu=False)
            self.upscore2 = upsample(2, learnable=True)
        if variant == "fcn8s":
            self.score_pool3 = conv(self.pool_channels["pool3"], num_classes, 1, relu=False)
            self.upscore_pool4 = upsample(2, learnable=True)
        final, factor = FINAL_UPSAMPLE[variant]
        self.add_module(final, upsample(factor, learnable=False))
        self.head_backend = None if twin else _backend_for(backend, upsample_ce.IMPLEMENTED)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He (Kaiming) normal weights and zero biases for the ReLU layers, so that a network trained from scratch
        keeps its signal through 15 layers without normalisation (PyTorch's default init shrinks it); zero score
        layers, as the paper initialises them; bilinear upsampling (set at construction). Loading VGG16 weights
        replaces the ReLU layers'."""
        for module in self.modules():
            if isinstance(module, (Conv2dReLU, _TorchConv)) and module.relu:
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)
        self.reset_scores()

    def reset_scores(self) -> None:
        """Zero the score layers, as the paper initialises them."""
        for name in ("score_fr", "score_pool4", "score_pool3"):
            layer = getattr(self, name, None)
            if layer is not None:
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    def _skip_score(self, name: str, pool: Tensor, like: Tensor) -> Tensor:
        """score_pool4 / score_pool3 on the cropped window of the pool output that lines up with ``like``.

        The score layer is a 1x1 conv, so cropping its input first gives the same values as cropping its output
        (what the reference does) while computing only the kept pixels; the twin crops the output, as the
        reference does."""
        off = self.crops[name]
        h, w = like.shape[2:]
        layer = getattr(self, name)
        if self.at_once:
            pool = pool * AT_ONCE_SCALE[name.removeprefix("score_")]
        if self.twin:
            return layer(pool)[:, :, off : off + h, off : off + w]
        return layer(pool[:, :, off : off + h, off : off + w])

    @staticmethod
    def _full(x: Tensor, factor: int) -> tuple[int, int]:
        return ((x.shape[2] - 1) * factor + 2 * factor, (x.shape[3] - 1) * factor + 2 * factor)

    def forward(
        self,
        x: Tensor,
        target: Tensor | None = None,
        *,
        reduction: Reduction = "sum",
        weight: Tensor | None = None,
        ignore_index: int = 255,
    ) -> Tensor:
        """N x 3 x H x W images to N x num_classes x H x W scores; with ``target`` (N x H x W int64 labels) the
        softmax cross-entropy loss instead, reduced as ``reduction`` says (see :meth:`loss`)."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"FCN input must be N x 3 x H x W images, got shape {tuple(x.shape)}")
        if target is not None and (target.dim() != 3 or tuple(target.shape) != (x.shape[0], *x.shape[2:])):
            raise ValueError(f"target must be N x H x W labels of the images' size, got {tuple(target.shape)}")
        h = self._coarse_scores(x)
        final, factor = FINAL_UPSAMPLE[self.variant]
        off = self.crops[final]
        size = (x.shape[2], x.shape[3])
        if target is None or self.twin:
            scores = getattr(self, final)(h, (off, off), size)
            if target is None:
                return scores
            return F.cross_entropy(scores, target, weight, ignore_index=ignore_index, reduction=reduction)
        return upsample_ce.upsample_cross_entropy(
            h, target, factor, (off, off), weight, ignore_index, reduction, backend=self.head_backend
        )

    def loss(self, x: Tensor, target: Tensor, **options) -> Tensor:
        """The training loss of images x against target, ``self(x, target, **options)``: the fused head on the
        fcnkern network (no N x C x H x W logits or logit gradient), F.cross_entropy on the twin. Options:
        ``reduction`` ("sum", the paper's loss; "mean"; "none"), ``weight``, ``ignore_index`` (255)."""
        return self(x, target, **options)

    def _coarse_scores(self, x: Tensor) -> Tensor:
        """The class scores before the final upsampling (after the skips' fusion)."""
        pools = {}
        h = x
        bg = background.image_background(x.shape[2], x.shape[3]) if self.skips_background(x) else None
        for name, layer in self.features.items():
            if bg is not None and isinstance(layer, Conv2dReLU) and background.eligible(layer):
                h, bg = background.conv2d_relu(h, bg, layer)
            elif bg is not None and background.pool_eligible(layer):
                h, bg = background.max_pool2d(h, bg, layer)
            else:  # anything else ends the tracking
                h, bg = layer(background.dense(h)), None
            if name.startswith("pool"):
                pools[name] = h
        h = self.drop6(self.fc6(background.dense(h)))
        h = self.drop7(self.fc7(h))
        h = self.score_fr(h)
        if self.variant in ("fcn16s", "fcn8s"):
            h = self.upscore2(h, (0, 0), self._full(h, 2))
            h = h + self._skip_score("score_pool4", background.dense(pools["pool4"]), h)
        if self.variant == "fcn8s":
            h = self.upscore_pool4(h, (0, 0), self._full(h, 2))
            h = h + self._skip_score("score_pool3", background.dense(pools["pool3"]), h)
        return h

    def to_twin(self) -> FCN:
        """This network in plain PyTorch modules (the pure-PyTorch twin) with its weights, device, dtype and
        train/eval mode: what to hand torch.export, torch.onnx.export or a runtime without fcnkern. fcnkern's
        layers are custom ops there, and the skipped background of CPU inputs would trace into hundreds of slices
        and small convolutions; the twin traces into one op per layer."""
        twin = FCN(self.variant, self.num_classes, twin=True, at_once=self.at_once, width=self.width,
                   dropout=self.drop6.p)  # fmt: skip
        reference = next(self.parameters())
        twin.to(reference.device, reference.dtype).load_state_dict(self.state_dict())
        return twin.train(self.training)

    def skips_background(self, x: Tensor) -> bool:
        """Whether the forward on x computes the early layers without their constant background (see
        ``skip_background``)."""
        if self.twin:
            return False
        return x.device.type == "cpu" if self.skip_background is None else self.skip_background

    def layer_backends(self) -> dict[str, str | None]:
        """The backend each fcnkern layer was given (None: chosen per call); "torch" for the twin."""
        return {
            name: "torch" if self.twin else module.backend
            for name, module in self.named_modules()
            if isinstance(module, (Conv2dReLU, UpsampleCrop, _TorchConv, _TorchUpsample))
        }

    def layer_path(self) -> list[geometry.Layer]:
        """The spatial layers from the input to the output along the main path, for receptive-field reports."""
        fr = list(geometry.VGG16_FCN_TRUNK)
        ups = {"fcn32s": [("upscore", 32)], "fcn16s": [("upscore2", 2), ("upscore16", 16)]}
        ups["fcn8s"] = [("upscore2", 2), ("upscore_pool4", 2), ("upscore8", 8)]
        return fr + [geometry.Layer(name, "deconv", 2 * f, f) for name, f in ups[self.variant]]


def fcn32s(num_classes: int = 21, backend: str | None = None, **kwargs) -> FCN:
    """FCN-32s: score_fr upsampled 32x in one fixed bilinear step."""
    return FCN("fcn32s", num_classes, backend, **kwargs)


def fcn16s(num_classes: int = 21, backend: str | None = None, **kwargs) -> FCN:
    """FCN-16s: score_fr upsampled 2x (learned), fused with score_pool4, then 16x (fixed)."""
    return FCN("fcn16s", num_classes, backend, **kwargs)


def fcn8s(num_classes: int = 21, backend: str | None = None, **kwargs) -> FCN:
    """FCN-8s: as FCN-16s, then 2x again fused with score_pool3, then 8x (fixed)."""
    return FCN("fcn8s", num_classes, backend, **kwargs)


def receptive_field(model: FCN) -> list[geometry.FieldInfo]:
    """Receptive field size, jump and start (in input pixels) after each layer of the model's main path."""
    return geometry.receptive_field(model.layer_path())


# torchvision's VGG16 numbers its conv layers by position in ``features``.
_TORCHVISION_CONV_INDEX = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)


def vgg16_backbone_from_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """FCN-named weights (features.conv1_1 .. features.conv5_3, fc6, fc7) from a torchvision-format VGG16
    state_dict (``features.{i}.*``, ``classifier.{0,3}.*``), with the classifier's Linear weights reshaped into
    conv weights (fc6: 4096 x 25088 -> 4096 x 512 x 7 x 7). Load the result with ``load_state_dict(...,
    strict=False)``. Nothing is downloaded: pass a state_dict you have."""
    names = [f"conv{b}_{i}" for b, count, _ in VGG16_BLOCKS for i in range(1, count + 1)]
    out: dict[str, Tensor] = {}
    try:
        for name, index in zip(names, _TORCHVISION_CONV_INDEX, strict=True):
            out[f"features.{name}.weight"] = state_dict[f"features.{index}.weight"]
            out[f"features.{name}.bias"] = state_dict[f"features.{index}.bias"]
        fc6 = state_dict["classifier.0.weight"]
        if fc6.shape[1] % 49 != 0:
            raise ValueError(f"classifier.0.weight has {fc6.shape[1]} inputs: not a flattened C x 7 x 7 map")
        out["fc6.weight"] = fc6.reshape(fc6.shape[0], -1, 7, 7)
        out["fc6.bias"] = state_dict["classifier.0.bias"]
        fc7 = state_dict["classifier.3.weight"]
        out["fc7.weight"] = fc7.reshape(*fc7.shape, 1, 1)
        out["fc7.bias"] = state_dict["classifier.3.bias"]
    except KeyError as exc:
        raise ValueError(f"not a torchvision VGG16 state_dict: missing {exc}") from None
    return out


def init_from(model: FCN, source: FCN | Mapping[str, Tensor]) -> list[str]:
    """Copy every weight of ``source`` (a coarser FCN or its state_dict) whose name and shape match into
    ``model``: FCN-16s from FCN-32s, FCN-8s from FCN-16s, as in the paper's staged training. Returns the names
    copied; raises if nothing matches."""
    src = source.state_dict() if isinstance(source, nn.Module) else dict(source)
    own = model.state_dict()
    copied = [k for k, v in src.items() if k in own and own[k].shape == v.shape]
    if not copied:
        raise ValueError("no weight of the source matches the model by name and shape")
    with torch.no_grad():
        for k in copied:
            own[k].copy_(src[k])
    return copied
