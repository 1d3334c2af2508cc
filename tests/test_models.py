"""The VGG16 FCNs on fcnkern layers against their pure-PyTorch twins: same weights, same outputs and gradients, on
every backend and on inputs of any size; weight loading, staged initialisation, receptive fields, crops."""

from __future__ import annotations

import pytest
import torch
from helpers import fcn_and_twin, generator, rel_err

import fcnkern
from fcnkern import geometry, models

VARIANTS = geometry.FCN_VARIANTS
WIDTH = 1 / 16  # channels 4..32, fc6/fc7 256: the real topology, small enough for every backend here


def _pair(variant: str, backend: str, width: float = WIDTH, **kwargs):
    return fcn_and_twin(variant, backend, ("weights", variant), width, **kwargs)


def _outputs_and_grads(model, x, upstream):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    out = model(x)
    out.backward(upstream)
    grads = {name: p.grad for name, p in model.named_parameters()}
    return out.detach(), x.grad, grads


def _backends() -> list:
    params = []
    for backend in ("cpu", "triton", "cuda", "torch"):
        info = fcnkern.backend_info(backend)
        marks = [] if info.available else [pytest.mark.skip(reason=f"backend {backend!r} unavailable: {info.reason}")]
        params.append(pytest.param(backend, marks=marks, id=backend))
    return params


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("size", [(1, 1), (5, 7), (37, 41)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_pytorch_twin_forward_and_backward(variant, backend, size):
    if backend == "triton" and not torch.cuda.is_available():
        pytest.skip("no CUDA device: the Triton interpreter needs many minutes for a VGG16 at padding 100 (the "
                    "op-level tests cover the Triton kernels on CPU)")  # fmt: skip
    model, twin = _pair(variant, backend)
    g = generator("input", variant, size)
    x = torch.randn(2, 3, *size, generator=g)
    upstream = torch.randn(2, 21, *size, generator=g)
    if backend in ("triton", "cuda"):  # on the GPU (TF32 off: conftest), compared with the twin on the CPU
        out, dx, grads = _outputs_and_grads(model.cuda(), x.cuda(), upstream.cuda())
        out, dx, grads = out.cpu(), dx.cpu(), {k: v.cpu() for k, v in grads.items()}
    else:
        out, dx, grads = _outputs_and_grads(model, x, upstream)
    t_out, t_dx, t_grads = _outputs_and_grads(twin, x, upstream)
    _, r_dx, r_grads = _outputs_and_grads(twin.double(), x.double(), upstream.double())
    assert out.shape == (2, 21, *size)
    assert rel_err(out, t_out) < 1e-5
    assert grads.keys() == t_grads.keys()
    # Gradients that do not flow back through a max-pool are unique: always tight.
    after_pools = [name for name in grads if not name.startswith("features.")]
    for name in after_pools:
        assert rel_err(grads[name], r_grads[name]) < 1e-4, name
    # Through the pools, a window whose maximum is tied (the constant border that conv1_1's padding of 100 makes)
    # may send its gradient to either input, and PyTorch's own fp32 result then differs from its fp64 one by
    # percents (FCN-32s here). Where PyTorch's fp32 gradient is tie-free, ours must match as tightly.
    if rel_err(t_dx, r_dx) < 1e-4:
        assert rel_err(dx, r_dx) < 1e-4
        for name in grads:
            assert rel_err(grads[name], r_grads[name]) < 1e-4, name


def test_large_input_matches_twin():
    """An input larger than 500 x 500 (the crops and ceil-mode pooling at a size the paper never saw)."""
    model, twin = _pair("fcn8s", "cpu", width=1 / 32)
    x = torch.randn(1, 3, 503, 509, generator=generator("large"))
    with torch.no_grad():
        assert rel_err(model(x), twin(x)) < 1e-5


def test_state_dicts_share_keys_and_crops_come_from_geometry():
    for variant in VARIANTS:
        model, twin = models.FCN(variant, width=WIDTH), models.FCN(variant, twin=True, width=WIDTH)
        assert model.state_dict().keys() == twin.state_dict().keys()
        assert model.crops == geometry.fcn_crops(variant)
    assert models.fcn8s(width=WIDTH).crops == {"score_pool4": 5, "score_pool3": 9, "upscore8": 31}


def test_at_once_scaling_is_applied():
    model, twin = _pair("fcn8s", "cpu", at_once=True)
    plain, _ = _pair("fcn8s", "cpu")
    x = torch.randn(1, 3, 40, 40, generator=generator("at_once"))
    with torch.no_grad():
        assert rel_err(model(x), twin(x)) < 1e-5
        assert rel_err(model(x), plain(x)) > 1e-3


def test_score_layers_start_at_zero_and_upsampling_bilinear():
    model = models.fcn8s(width=WIDTH)
    assert (model.score_fr.weight == 0).all() and (model.score_pool3.bias == 0).all()
    torch.testing.assert_close(model.upscore2.weight, fcnkern.bilinear_weight(21, 4))
    assert not model.upscore8.learnable and model.upscore2.learnable


def _fake_torchvision_vgg16(width: float) -> dict[str, torch.Tensor]:
    """A torchvision-format VGG16 state_dict (features.{i}, classifier.{0,3}) with scaled channel counts."""
    sd, cin, index = {}, 3, 0
    g = generator("vgg")
    for _, count, channels in models.VGG16_BLOCKS:
        c = max(1, round(channels * width))
        for _ in range(count):
            sd[f"features.{index}.weight"] = torch.randn(c, cin, 3, 3, generator=g)
            sd[f"features.{index}.bias"] = torch.randn(c, generator=g)
            cin = c
            index += 2
        index += 1  # the pooling layer
    fc = round(4096 * width)
    sd["classifier.0.weight"] = torch.randn(fc, cin * 49, generator=g)
    sd["classifier.0.bias"] = torch.randn(fc, generator=g)
    sd["classifier.3.weight"] = torch.randn(fc, fc, generator=g)
    sd["classifier.3.bias"] = torch.randn(fc, generator=g)
    sd["classifier.6.weight"] = torch.randn(1000, fc, generator=g)
    return sd


def test_vgg16_weights_load_and_classifier_is_convolutionalised():
    vgg = _fake_torchvision_vgg16(WIDTH)
    model = models.fcn32s(width=WIDTH)
    weights = models.vgg16_backbone_from_state_dict(vgg)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and all(k.startswith(("score", "upscore")) for k in missing)
    assert torch.equal(model.features.conv3_2.weight, vgg["features.12.weight"])
    # fc6 as a 7x7 conv on a 7x7 map is the Linear layer on the flattened map.
    pool5 = torch.randn(1, model.fc6.in_channels, 7, 7)
    linear = pool5.flatten(1) @ vgg["classifier.0.weight"].T + vgg["classifier.0.bias"]
    conv = torch.nn.functional.conv2d(pool5, model.fc6.weight, model.fc6.bias)
    torch.testing.assert_close(conv.flatten(1), linear, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="missing"):
        models.vgg16_backbone_from_state_dict({"features.0.weight": vgg["features.0.weight"]})


def test_staged_initialisation():
    fcn32 = models.fcn32s(width=WIDTH)
    torch.nn.init.normal_(fcn32.score_fr.weight)
    fcn16 = models.fcn16s(width=WIDTH)
    copied = models.init_from(fcn16, fcn32)
    assert "score_fr.weight" in copied and "features.conv1_1.weight" in copied
    assert not any(k.startswith(("score_pool4", "upscore2")) for k in copied)
    assert torch.equal(fcn16.score_fr.weight, fcn32.score_fr.weight)
    fcn8 = models.fcn8s(width=WIDTH)
    assert "score_pool4.weight" in models.init_from(fcn8, fcn16)
    with pytest.raises(ValueError, match="no weight"):
        models.init_from(fcn8, {"nothing": torch.zeros(1)})


def test_receptive_field_report():
    fields = {f.name: f for f in fcnkern.receptive_field(models.fcn32s(width=WIDTH))}
    assert fields["pool5"].size == 212 and fields["pool5"].jump == 32
    assert fields["fc6"].size == 404 and fields["fc7"].size == 404
    assert fields["upscore"].jump == 1


def test_layer_backends_are_inspectable():
    model = models.fcn8s(width=WIDTH, backend="cpu")
    backends = model.layer_backends()
    assert backends["fc6"] == "cpu"
    # No cpu kernel for the learned upsampling yet: the model says it runs on torch.
    assert backends["upscore2"] in ("cpu", "torch")
    assert set(models.fcn8s(width=WIDTH, twin=True).layer_backends().values()) == {"torch"}


def test_bad_input():
    model = models.fcn32s(width=WIDTH)
    with pytest.raises(ValueError, match="N x 3 x H x W"):
        model(torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match="unknown FCN variant"):
        models.FCN("fcn4s")
