"""Skipping FCN's constant background (fcnkern.background): the geometry marks only pixels that really are one value
per channel, and the network computed without them gives the dense network's outputs and gradients."""

from __future__ import annotations

import pytest
import torch
from helpers import generator, rel_err

from fcnkern import background, models
from fcnkern.nn import Conv2dReLU

WIDTH = 1 / 16


def _models(**kwargs):
    torch.manual_seed(0)
    skip = models.FCN("fcn8s", width=WIDTH, skip_background=True, **kwargs)
    dense = models.FCN("fcn8s", width=WIDTH, skip_background=False, **kwargs)
    g = generator("background-weights")
    # Random biases too: zero biases would make the background exactly 0 and hide a wrong fill value.
    state = {
        k: torch.randn(v.shape, generator=g) * 0.1 if k.startswith("score") or k.endswith("bias") else v
        for k, v in skip.state_dict().items()
    }
    skip.load_state_dict(state)
    dense.load_state_dict(state)
    return skip.eval(), dense.eval()


@pytest.mark.parametrize("size", [(1, 1), (2, 3), (17, 29), (64, 61), (131, 97)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_marked_pixels_are_constant_in_the_dense_network(size):
    """Run the dense layers one by one and check every pixel the geometry calls background against the reference."""
    _, dense = _models()
    x = torch.randn(2, 3, *size, generator=generator("bg-input", size))
    bg = background.image_background(*size)
    h = x
    tracked = 0
    with torch.no_grad():
        for name, layer in dense.features.items():
            h = layer(h)
            if isinstance(layer, Conv2dReLU):
                bg = background.conv_background(bg, layer, *h.shape[2:])
            else:
                bg = background.pool2d(bg, layer.kernel_size, layer.stride, *h.shape[2:])
            rects = bg.constant_rects()
            if not rects:
                continue
            r0, _, c0, _ = rects[0]
            value = h[:, :, r0 : r0 + 1, c0 : c0 + 1]
            for a, b, c, d in rects:
                block = h[:, :, a:b, c:d]
                torch.testing.assert_close(block, value.expand_as(block), rtol=1e-5, atol=1e-6, msg=name)
                tracked += block.numel()
            # ... and the pixels outside it are not all that value (the geometry is not vacuous).
            assert bg.varying_rects(), name
    assert tracked > 0


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("size", [(1, 1), (5, 7), (40, 33), (101, 89)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_skipping_matches_the_dense_network(size, channels_last):
    skip, dense = _models()
    g = generator("bg-parity", size)
    x = torch.randn(2, 3, *size, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    upstream = torch.randn(2, 21, *size, generator=g)
    results = []
    for model in (skip, dense):
        model.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_()
        out = model(xx)
        out.backward(upstream)
        results.append((out.detach(), xx.grad, {k: p.grad for k, p in model.named_parameters()}))
    (out, dx, grads), (r_out, r_dx, r_grads) = results
    assert skip.skips_background(x) and not dense.skips_background(x)
    assert rel_err(out, r_out) < 1e-5
    assert rel_err(dx, r_dx) < 1e-4
    for name in grads:
        assert rel_err(grads[name], r_grads[name]) < 1e-4, name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_skipping_in_low_precision(dtype):
    """fp16/bf16 through the pieces: judged against the fp32 dense network, no worse than twice the dense network's
    own low-precision error."""
    skip, dense = _models()
    x = torch.randn(1, 3, 23, 19, generator=generator("bg-lowp"))
    with torch.no_grad():
        ref = dense(x)
        ours = skip.to(dtype)(x.to(dtype)).float()
        theirs = dense.to(dtype)(x.to(dtype)).float()
    assert rel_err(ours, ref) <= 2 * rel_err(theirs, ref) + 1e-3


def test_geometry_of_the_paper_network():
    """conv1_1 at 256 x 256: everything but the 258 x 258 window that sees the image is relu(bias)."""
    bg = background.image_background(256, 256)
    out = background._propagate(bg, (3, 3), (1, 1), (100, 100), 454, 454)
    assert out.varying_rects() == [(98, 356, 98, 356)]
    assert out.constant_fraction() == pytest.approx(1 - 258**2 / 454**2)
    conv1_2 = background._propagate(out, (3, 3), (1, 1), (1, 1), 454, 454)
    # The layer's own zero padding makes a one-pixel border that is not background.
    assert conv1_2.varying_rects()[0] == (0, 1, 0, 454)
    assert (97, 357, 97, 357) in conv1_2.varying_rects()


def test_default_is_cpu_only_and_twin_never_skips():
    model = models.fcn8s(21, width=WIDTH)
    twin = models.fcn8s(21, width=WIDTH, twin=True, skip_background=True)
    x = torch.zeros(1, 3, 8, 8)
    assert model.skips_background(x)
    assert not model.skips_background(x.to("meta"))
    assert not twin.skips_background(x)


def test_wrong_background_size_is_an_error():
    layer = Conv2dReLU(3, 4, 3, padding=1)
    with pytest.raises(ValueError, match="background is for"):
        background.conv2d_relu(torch.randn(1, 3, 8, 8), background.image_background(9, 8), layer)


def _map_leaves(bg: background.Background, channels: int, key: str):
    """A 2 x channels map whose background really is one value per channel, from random leaves (the background value
    and the varying pieces), as the skipping network builds its maps: (leaves, its Pieces)."""
    g = generator("bg-pool-map", key)
    value = torch.randn(2, channels, 1, 1, generator=g).requires_grad_()
    rects = bg.varying_rects()
    pieces = [torch.randn(2, channels, r1 - r0, c1 - c0, generator=g).requires_grad_() for r0, r1, c0, c1 in rects]
    return [value, *pieces], background.Pieces(value, bg, tuple(rects), tuple(pieces))


@pytest.mark.parametrize("held_as", ["pieces", "tensor"])
@pytest.mark.parametrize("ceil_mode", [True, False], ids=["ceil", "floor"])
@pytest.mark.parametrize("kernel, stride", [(2, 2), (3, 2), (3, 1)], ids=["k2s2", "k3s2", "k3s1"])
@pytest.mark.parametrize("size", [(1, 1), (7, 4), (40, 33)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_max_pool_pieces_match_the_dense_pool(size, kernel, stride, ceil_mode, held_as):
    """The background-skipping max-pool gives the dense pool's output bit for bit (odd maps: ceil mode's cut last
    windows) and the same gradients of the leaves the map was built from: its pieces route the gradient to the same
    window maxima, and the background's share reaches the background value either way. Its input held as Pieces (the
    windows gathered from them) or assembled."""
    bg = background.image_background(*size)
    bg = background._propagate(bg, (3, 3), (1, 1), (100, 100), size[0] + 198, size[1] + 198)  # conv1_1's output
    bg = background._propagate(bg, (3, 3), (1, 1), (1, 1), bg.height, bg.width)  # conv1_2's: a varying border
    layer = torch.nn.MaxPool2d(kernel, stride, ceil_mode=ceil_mode)
    leaves, held = _map_leaves(bg, 3, f"{size}")
    ours, ours_bg = background.max_pool2d(held if held_as == "pieces" else held.dense(), bg, layer)
    dense = layer(held.dense())
    assert isinstance(ours, background.Pieces)  # pooled in pieces
    assert torch.equal(ours.dense(), dense)
    assert ours_bg == background._propagate(bg, (kernel, kernel), (stride, stride), (0, 0), *dense.shape[2:])
    upstream = torch.randn(dense.shape, generator=generator("bg-pool-upstream", size))
    # A piece no window reads (a floor-mode pool drops the map's last row) gets None: zeros, as through the dense map.
    ours_grads, dense_grads = (
        torch.autograd.grad(out, leaves, upstream, allow_unused=True, materialize_grads=True)
        for out in (ours.dense(), dense)
    )
    for a, b in zip(ours_grads, dense_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_conv_on_pieces_matches_the_assembled_map(channels_last):
    """A conv reading its windows from Pieces (values, and the gradients of every leaf) against the same conv on the
    assembled map: a padded 3 x 3 layer whose windows cut across the box, the frame and the background."""
    bg = background.image_background(9, 6)
    bg = background._propagate(bg, (3, 3), (1, 1), (100, 100), 207, 204)
    bg = background._propagate(bg, (3, 3), (1, 1), (1, 1), bg.height, bg.width)
    leaves, held = _map_leaves(bg, 4, "conv")
    if channels_last:
        pieces = tuple(p.contiguous(memory_format=torch.channels_last) for p in held.pieces)
        held = background.Pieces(held.value, bg, held.rects, pieces)
    torch.manual_seed(0)
    layer = Conv2dReLU(4, 5, 3, padding=1)
    with torch.no_grad():
        layer.bias.normal_()
    ours, ours_bg = background.conv2d_relu(held, bg, layer)
    ref, ref_bg = background.conv2d_relu(held.dense(), bg, layer)
    dense = layer(held.dense())
    assert isinstance(ours, background.Pieces) and ours_bg == ref_bg
    torch.testing.assert_close(ours.dense(), dense, rtol=1e-5, atol=1e-5)
    upstream = torch.randn(dense.shape, generator=generator("bg-conv-upstream"))
    params = [*leaves, layer.weight, layer.bias]
    ours_grads, dense_grads = (torch.autograd.grad(out, params, upstream) for out in (ours.dense(), dense))
    for a, b in zip(ours_grads, dense_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert torch.equal(ours.dense(), ref.dense())


def test_max_pool_needs_an_unpadded_pool():
    bg = background.image_background(8, 8)
    _, held = _map_leaves(background.Background(8, 8, (1, 7, 1, 7), (3, 5, 3, 5)), 3, "mismatch")
    with pytest.raises(ValueError, match="laid out for"):
        background.max_pool2d(held, bg, torch.nn.MaxPool2d(2))
    with pytest.raises(ValueError, match="cannot skip background"):
        background.max_pool2d(torch.randn(1, 3, 8, 8), bg, torch.nn.MaxPool2d(2, 2, padding=1))
    with pytest.raises(ValueError, match="background is for"):
        background.max_pool2d(torch.randn(1, 3, 8, 8), background.image_background(9, 8), torch.nn.MaxPool2d(2))
