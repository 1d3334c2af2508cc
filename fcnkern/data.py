"""Datasets for the main job: built-in synthetic scenes (no download) and the PASCAL VOC / SBD directory layout.

Both yield ``(image, label)``: image 3 x H x W float32 (roughly zero-mean, unit-scale), label H x W int64 with
classes in [0, num_classes) and 255 for void pixels, as PASCAL marks object borders.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["IGNORE_INDEX", "SyntheticScenes", "VOCSegmentation", "denormalize", "voc_palette"]

IGNORE_INDEX = 255
# Mean and std of ImageNet, which VGG16 weights expect.
_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def denormalize(image: Tensor) -> Tensor:
    """A dataset image (3 x H x W, ImageNet-normalised) back to RGB in [0, 1] (unclamped)."""
    return image * _STD + _MEAN


def voc_palette() -> np.ndarray:
    """PASCAL VOC's 256-entry colour map (uint8, 256 x 3): class i's colour from the bits of i; 255 is void."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    for i in range(256):
        c, r, g, b = i, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette[i] = (r, g, b)
    return palette


def _smooth_noise(g: torch.Generator, size: int, cells: int) -> Tensor:
    """A size x size field of smooth random texture in about [-1, 1] (bilinearly upsampled coarse noise)."""
    coarse = torch.randn(1, 1, cells, cells, generator=g)
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)[0, 0]


class SyntheticScenes(Dataset):
    """Random scenes of coloured shapes on textured backgrounds, reproducible from (seed, index).

    Class 0 is the background; classes 1..num_classes-1 are shapes, each with its own form (rectangle, ellipse,
    triangle, ring, cycling) and its own hue, with texture and brightness jitter so that colour alone does not
    decide every pixel. A void band (label 255) lines every shape's border, as in PASCAL VOC.

    Args:
        length: number of scenes.
        size: image side in pixels.
        num_classes: classes including the background (2..9).
        seed: different seeds give disjoint-looking sets (train / val).
        void_width: width of the void border in pixels (0: none).
    """

    FORMS = ("rectangle", "ellipse", "triangle", "ring")

    def __init__(self, length: int = 512, size: int = 64, num_classes: int = 5, seed: int = 0, void_width: int = 1):
        if not 2 <= num_classes <= 9:
            raise ValueError(f"num_classes must be in 2..9, got {num_classes}")
        if length < 1 or size < 8:
            raise ValueError(f"need length >= 1 and size >= 8, got {length} and {size}")
        self.length, self.size, self.num_classes, self.seed, self.void_width = (
            length,
            size,
            num_classes,
            seed,
            void_width,
        )
        hues = torch.linspace(0, 1, num_classes)[:-1] if num_classes > 1 else torch.zeros(0)
        self.class_colors = torch.stack([_hue_to_rgb(float(h)) for h in hues]) if len(hues) else torch.zeros(0, 3)

    def __len__(self) -> int:
        return self.length

    def _form_mask(self, form: str, g: torch.Generator, yy: Tensor, xx: Tensor) -> Tensor:
        s = self.size
        cy, cx = (torch.rand(2, generator=g) * 0.7 + 0.15) * s
        ry, rx = (torch.rand(2, generator=g) * 0.18 + 0.1) * s
        if form == "rectangle":
            return ((yy - cy).abs() <= ry) & ((xx - cx).abs() <= rx)
        if form == "ellipse":
            return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        if form == "ring":
            r = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
            return (r <= 1) & (r >= 0.35)
        # triangle pointing up: inside the apex-down cone and above the base
        return (yy <= cy + ry) & ((xx - cx).abs() <= (yy - (cy - ry)) * rx / (2 * ry))

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} scenes")
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        s = self.size
        yy, xx = torch.meshgrid(
            torch.arange(s, dtype=torch.float32), torch.arange(s, dtype=torch.float32), indexing="ij"
        )
        grey = 0.45 + 0.15 * _smooth_noise(g, s, 6)
        image = grey.expand(3, s, s).clone() + 0.05 * _smooth_noise(g, s, 16)
        label = torch.zeros(s, s, dtype=torch.int64)
        void = torch.zeros(s, s, dtype=torch.bool)
        for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
            cls = int(torch.randint(1, self.num_classes, (1,), generator=g))
            mask = self._form_mask(self.FORMS[(cls - 1) % len(self.FORMS)], g, yy, xx)
            if not mask.any():
                continue
            brightness = 0.75 + 0.5 * float(torch.rand(1, generator=g))
            color = (self.class_colors[cls - 1] * brightness).view(3, 1, 1)
            texture = 1 + 0.15 * _smooth_noise(g, s, 10)
            image = torch.where(mask, color * texture, image)
            label[mask] = cls
            void &= ~mask  # a later shape covers earlier borders it overlaps
            if self.void_width > 0:
                void |= _border(mask, self.void_width)
        image = image + 0.03 * torch.randn(3, s, s, generator=g)
        label[void] = IGNORE_INDEX
        return ((image.clamp(0, 1) - _MEAN) / _STD).float(), label


def _border(mask: Tensor, width: int) -> Tensor:
    """Pixels within ``width`` of the mask's boundary (dilation minus erosion)."""
    m = mask.float()[None, None]
    k = 2 * width + 1
    dilated = F.max_pool2d(m, k, 1, width)
    eroded = -F.max_pool2d(-m, k, 1, width)
    return (dilated - eroded)[0, 0] > 0


def _hue_to_rgb(h: float) -> Tensor:
    """A saturated colour of hue h in [0, 1)."""
    return torch.tensor([0.5 + 0.5 * math.cos(2 * math.pi * (h - k / 3)) for k in range(3)])


class VOCSegmentation(Dataset):
    """PASCAL VOC 2012 / SBD-style segmentation data from ``root``:
    ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png`` (palette PNGs whose indices are the labels, 255 void)
    and ``ImageSets/Segmentation/<split>.txt`` (one id per line). Nothing is downloaded."""

    NUM_CLASSES = 21

    def __init__(self, root: str | Path, split: str = "train", size: int | None = None):
        self.root = Path(root)
        list_file = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        for needed in (self.root / "JPEGImages", self.root / "SegmentationClass", list_file):
            if not needed.exists():
                raise FileNotFoundError(f"not a PASCAL VOC directory: {needed} does not exist")
        self.ids = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
        if not self.ids:
            raise ValueError(f"{list_file} lists no images")
        self.size = size
        self.num_classes = self.NUM_CLASSES

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        from PIL import Image

        name = self.ids[index]
        with Image.open(self.root / "JPEGImages" / f"{name}.jpg") as im:
            rgb = im.convert("RGB")
            if self.size is not None:
                rgb = rgb.resize((self.size, self.size), Image.BILINEAR)
            image = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)
        with Image.open(self.root / "SegmentationClass" / f"{name}.png") as im:
            if im.mode != "P":
                raise ValueError(f"{name}.png is not a palette PNG (mode {im.mode}); VOC labels are palette indices")
            if self.size is not None:
                im = im.resize((self.size, self.size), Image.NEAREST)
            label = torch.from_numpy(np.asarray(im, dtype=np.int64).copy())
        return (image - _MEAN) / _STD, label
