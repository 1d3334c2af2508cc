"""The paper's coordinate geometry: crop offsets derived from the layer list, sizes and maps checked against
real PyTorch layers."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from fcnkern import geometry as g


def test_reference_fcn_crop_offsets():
    assert g.fcn_crops("fcn32s") == {"upscore": 19}
    assert g.fcn_crops("fcn16s") == {"score_pool4": 5, "upscore16": 27}
    assert g.fcn_crops("fcn8s") == {"score_pool4": 5, "score_pool3": 9, "upscore8": 31}


@pytest.mark.parametrize("variant", g.FCN_VARIANTS)
def test_every_crop_lands_inside_for_all_input_sizes(variant):
    for size in range(1, 601):
        for name, (offset, src_len, ref_len) in g.fcn_crop_fits(variant, size).items():
            assert ref_len >= 1 and offset + ref_len <= src_len, (variant, size, name, offset, src_len, ref_len)


def test_vgg16_receptive_fields():
    fields = {f.name: f for f in g.receptive_field(g.VGG16_FCN_TRUNK)}
    assert fields["conv1_2"].size == 5 and fields["pool1"].jump == 2
    assert fields["pool5"].size == 212 and fields["pool5"].jump == 32
    assert fields["fc7"].size == 404 and fields["fc7"].jump == 32


def _torch_layer(layer: g.Layer):
    if layer.kind == "conv":
        w = torch.ones(1, 1, layer.kernel, layer.kernel, dtype=torch.float64)
        return lambda x: F.conv2d(x, w, stride=layer.stride, padding=layer.padding, dilation=layer.dilation)
    if layer.kind == "pool":
        return lambda x: F.max_pool2d(x, layer.kernel, layer.stride, layer.padding, ceil_mode=layer.ceil_mode)
    w = torch.ones(1, 1, layer.kernel, layer.kernel, dtype=torch.float64)
    return lambda x: F.conv_transpose2d(x, w, stride=layer.stride, padding=layer.padding)


@pytest.mark.parametrize("size", [1, 2, 7, 31, 32, 33, 97, 224, 500])
def test_output_sizes_match_pytorch(size):
    layers = [*g.VGG16_FCN_TRUNK, g.Layer("upscore", "deconv", 64, 32)]
    x = torch.randn(1, 1, size, 3, dtype=torch.float64)
    for i, layer in enumerate(layers):
        x = _torch_layer(layer)(x)
        assert x.shape[-2] == g.output_size(layers[: i + 1], size), (layer.name, size)


@pytest.mark.parametrize("ceil_mode", [False, True], ids=["floor", "ceil"])
def test_pool_output_sizes_match_pytorch_on_small_maps(ceil_mode):
    """Every pool of kernel 1-4, stride 1-3 and padding up to half the kernel over maps of 1-12 pixels: PyTorch's
    size, and 0 where PyTorch refuses the map. A ceil-mode window wider than the map still gives one output (2 pixels
    under a 3-wide window); out_size had said 0 there."""
    for kernel in range(1, 5):
        for stride in range(1, 4):
            for padding in range(kernel // 2 + 1):
                layer = g.Layer("p", "pool", kernel, stride, padding, ceil_mode=ceil_mode)
                for n in range(1, 13):
                    try:
                        expected = _torch_layer(layer)(torch.zeros(1, 1, n, n, dtype=torch.float64)).shape[-2]
                    except RuntimeError:
                        expected = 0
                    assert layer.out_size(n) == expected, (kernel, stride, padding, n)


@pytest.mark.parametrize(
    "layer",
    [
        g.Layer("c", "conv", 3, 1, 1),
        g.Layer("c", "conv", 7, 1, 100),
        g.Layer("c", "conv", 3, 1, 2, dilation=2),
        g.Layer("d", "deconv", 4, 2),
        g.Layer("d", "deconv", 64, 32),
        g.Layer("d", "deconv", 5, 3, 1),
    ],
    ids=lambda layer: f"{layer.kind}k{layer.kernel}s{layer.stride}p{layer.padding}d{layer.dilation}",
)
def test_coord_map_is_the_centre_of_the_response(layer):
    """An impulse at input x0 excites a window of outputs; the map sends that window's centre back to x0."""
    n, x0 = 40, 17
    x = torch.zeros(1, 1, n, dtype=torch.float64)
    x[0, 0, x0] = 1.0
    w = torch.ones(1, 1, layer.kernel, dtype=torch.float64)
    if layer.kind == "conv":
        y = F.conv1d(x, w, stride=layer.stride, padding=layer.padding, dilation=layer.dilation)
    else:
        y = F.conv_transpose1d(x, w, stride=layer.stride, padding=layer.padding)
    hit = torch.nonzero(y[0, 0]).flatten()
    centre = Fraction(int(hit.min()) + int(hit.max()), 2)
    m = layer.coord_map()
    assert m.scale * centre + m.shift == x0


def test_crop_offset_rejects_misaligned_blobs():
    conv = [g.Layer("c", "conv", 3, 2)]
    with pytest.raises(ValueError, match="different scales"):
        g.crop_offset(conv, [])
    with pytest.raises(ValueError, match="not a non-negative integer"):
        g.crop_offset([g.Layer("c", "conv", 2, 1)], [])
    with pytest.raises(ValueError, match="kind"):
        g.Layer("x", "linear", 1)
    with pytest.raises(ValueError, match="unknown FCN variant"):
        g.fcn_crops("fcn4s")
