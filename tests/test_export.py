"""Deployment: torch.export and ONNX export of the FCNs and of fcnkern.nn layers. ``model.to_twin()`` gives the same
network in plain PyTorch modules, which exports into one op per layer; on a kernel backend the exported graph keeps
fcnkern's custom ops (it runs, and saves and loads, where fcnkern is installed); under
``fcnkern.use_backend("torch")`` it is plain ATen. Each computes what the kernels compute."""

from __future__ import annotations

import pytest
import torch
from helpers import fcn_and_twin, generator
from torch import nn

import fcnkern
from fcnkern import geometry

needs_cpu_kernels = pytest.mark.skipif(
    not fcnkern.backend_info("cpu").available,
    reason=f"the cpu backend is unavailable: {fcnkern.backend_info('cpu').reason}",
)


def _ops(program: torch.export.ExportedProgram) -> set[str]:
    return {str(n.target) for n in program.graph.nodes if n.op == "call_function"}


def _image(*key) -> torch.Tensor:
    return torch.randn(2, 3, 45, 53, generator=generator("export", *key))


@pytest.mark.parametrize("variant", geometry.FCN_VARIANTS)
def test_to_twin_is_the_same_network_in_plain_pytorch_and_exports_small(variant):
    model, _ = fcn_and_twin(variant, None, ("export", variant), dropout=0.3)
    x = _image(variant)
    twin = model.to_twin()
    assert twin.twin and not twin.training and twin.drop6.p == 0.3
    assert set(twin.layer_backends().values()) == {"torch"}
    for (name, p), (twin_name, q) in zip(model.state_dict().items(), twin.state_dict().items(), strict=True):
        assert name == twin_name and torch.equal(p, q), name
    program = torch.export.export(twin, (x,))
    ops = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert not [op for op in ops if op.startswith("fcnkern")]
    assert len(ops) < 150, len(ops)  # one op per layer, about (the model on CPU input: over 1000)
    torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-5)  # the kernels here
    assert model.train().to_twin().training
    assert model.to(torch.float64).to_twin().fc6.weight.dtype == torch.float64


def test_export_under_the_torch_backend_is_plain_aten_and_matches():
    # backend=None: each layer takes the context's backend (an explicit backend= would win over it)
    model, twin = fcn_and_twin("fcn8s", None, ("export", "torch"))
    x = _image("torch")
    with fcnkern.use_backend("torch"):
        program = torch.export.export(model, (x,))
    ops = _ops(program)
    assert not {op for op in ops if op.startswith("fcnkern")}, ops
    assert {"aten.conv2d.default", "aten.conv_transpose2d.input"} <= ops, ops
    out = program.module()(x)
    torch.testing.assert_close(out, twin(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)  # the automatic backend's kernels


@needs_cpu_kernels
def test_export_on_a_kernel_backend_keeps_the_custom_ops_and_saves(tmp_path):
    model, _ = fcn_and_twin("fcn8s", "cpu", ("export", "cpu"))
    x = _image("cpu")
    program = torch.export.export(model, (x,))
    assert {"fcnkern.conv2d_relu.default", "fcnkern.bilinear_upsample_crop.default"} <= _ops(program)
    torch.export.save(program, tmp_path / "fcn8s.pt2")
    loaded = torch.export.load(tmp_path / "fcn8s.pt2")
    torch.testing.assert_close(loaded.module()(x), model(x), rtol=0, atol=0)


def test_nn_layers_export_as_their_torch_modules():
    g = generator("export", "layers")
    net = nn.Sequential(fcnkern.nn.Conv2dReLU(3, 8, 3, padding=1), fcnkern.nn.Conv2dReLU(8, 4, 1, relu=False))
    for p in net.parameters():
        p.data = torch.randn(p.shape, generator=g)
    x = _image("layers")
    with fcnkern.use_backend("torch"):
        program = torch.export.export(net, (x,))
    assert _ops(program) == {"aten.conv2d.default", "aten.relu.default"}
    ref = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    ref.load_state_dict({k.replace("1.", "2.", 1) if k.startswith("1.") else k: v for k, v in net.state_dict().items()})
    torch.testing.assert_close(program.module()(x), ref(x), rtol=1e-5, atol=1e-5)


def test_onnx_export_of_the_twin_matches_the_kernels(tmp_path):
    onnx = pytest.importorskip("onnx", reason="onnx is not installed (a dev extra)")
    pytest.importorskip("onnxscript", reason="onnxscript is not installed (a dev extra; torch.onnx's exporter)")
    from onnx.reference import ReferenceEvaluator

    model, _ = fcn_and_twin("fcn8s", None, ("export", "onnx"))
    x = _image("onnx")
    path = tmp_path / "fcn8s.onnx"
    torch.onnx.export(model.to_twin(), (x,), str(path), dynamo=True, verbose=False)
    graph = onnx.load(str(path))
    assert {"Conv", "ConvTranspose", "Relu", "MaxPool"} <= {node.op_type for node in graph.graph.node}
    (out,) = ReferenceEvaluator(graph).run(None, {graph.graph.input[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), model(x), rtol=1e-4, atol=1e-4)
