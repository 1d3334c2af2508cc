"""Fused Conv2d + ReLU: fcnkern's backends vs PyTorch, per FCN-8s layer at a 500 x 500 input, measured in the same
run. Baselines: eager ``F.relu(F.conv2d(...))`` (oneDNN / cuDNN conv, then a separate ReLU) and, on CPU, oneDNN's
own fused ``torch.ops.mkldnn._convolution_pointwise(..., "relu")`` (forward only: it has no autograd formula).

Shapes follow the network from conv1_1 (padding 100: a 698 x 698 output) down to fc6 (7 x 7 on 22 x 22) and fc7 /
score_fr (1 x 1). Batch 1, as in the paper's training. Peak memory is in each result's extra_info. The narrow layers
are the main job's default network (``fcnkern train``: FCN-8s at width 1/8 on 64 x 64 scenes, batch 8), whose few
channels per layer take other kernels.
"""

from __future__ import annotations

import os
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import fcnkern
from fcnkern.benchmarking import peak_extra_bytes, run_interleaved, synchronized

# name: (in channels, out channels, input size, kernel, padding, relu)
FCN8S_LAYERS = {
    "conv1_1": (3, 64, 500, 3, 100, True),
    "conv1_2": (64, 64, 698, 3, 1, True),
    "conv2_1": (64, 128, 349, 3, 1, True),
    "conv2_2": (128, 128, 349, 3, 1, True),
    "conv3_1": (128, 256, 175, 3, 1, True),
    "conv3_2": (256, 256, 175, 3, 1, True),
    "conv4_1": (256, 512, 88, 3, 1, True),
    "conv4_2": (512, 512, 88, 3, 1, True),
    "conv5_1": (512, 512, 44, 3, 1, True),
    "fc6": (512, 4096, 22, 7, 0, True),
    "fc7": (4096, 4096, 16, 1, 0, True),
    "score_fr": (4096, 21, 16, 1, 0, False),
}
# The same network at width 1/8 on a 64 x 64 input (the main job's default), batch 8: conv1_1 .. conv5_1, fc6, fc7.
NARROW_LAYERS = {
    "conv1_1": (3, 8, 64, 3, 100, True),
    "conv1_2": (8, 8, 262, 3, 1, True),
    "conv2_1": (8, 16, 131, 3, 1, True),
    "conv2_2": (16, 16, 131, 3, 1, True),
    "conv3_1": (16, 32, 66, 3, 1, True),
    "conv3_2": (32, 32, 66, 3, 1, True),
    "conv4_1": (32, 64, 33, 3, 1, True),
    "conv4_2": (64, 64, 33, 3, 1, True),
    "conv5_1": (64, 64, 17, 3, 1, True),
    "fc6": (64, 512, 9, 7, 0, True),
    "fc7": (512, 512, 3, 1, 0, True),
}
NARROW_BATCH = 8
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]


def _impls():
    for device in ("cpu", "cuda"):
        gpu_names = ["fcnkern-triton", "fcnkern-cuda", "eager"]
        names = ["fcnkern-cpu", "eager", "onednn-fused"] if device == "cpu" else gpu_names
        for name in names:
            marks = [] if device == "cpu" or torch.cuda.is_available() else [pytest.mark.skip(reason="no CUDA device")]
            yield pytest.param(device, name, marks=marks, id=f"{device}-{name}")


def _fn(impl: str, weight, bias, padding, relu):
    if impl.startswith("fcnkern-"):
        backend = impl.removeprefix("fcnkern-")
        info = fcnkern.backend_info(backend)
        if not info.available:
            pytest.skip(f"{backend} backend unavailable: {info.reason}")
        return lambda x: fcnkern.conv2d_relu(x, weight, bias, 1, padding, relu=relu, backend=backend)
    if impl == "onednn-fused":
        attr = "relu" if relu else "none"
        return lambda x: torch.ops.mkldnn._convolution_pointwise(
            x, weight, bias, [padding] * 2, [1, 1], [1, 1], 1, attr, [], ""
        )
    return lambda x: F.relu(F.conv2d(x, weight, bias, 1, padding)) if relu else F.conv2d(x, weight, bias, 1, padding)


def _layer_step(
    layer: str,
    device: str,
    impl: str,
    mode: str,
    layers: dict = FCN8S_LAYERS,
    batch: int = 1,
    dtype: torch.dtype | None = None,
):
    """One synchronised call of ``impl`` on ``layers[layer]``: the forward (no grad) or forward + backward, in
    ``dtype`` (default bf16 on CUDA, fp32 on the CPU)."""
    cin, cout, size, k, padding, relu = layers[layer]
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cin, size, size, generator=g).to(device, dtype)
    weight = (torch.randn(cout, cin, k, k, generator=g) / (cin * k * k) ** 0.5).to(device, dtype)
    bias = (torch.randn(cout, generator=g) * 0.1).to(device, dtype)
    if mode == "fwd":
        fn = _fn(impl, weight, bias, padding, relu)

        def step():
            with torch.no_grad():
                return fn(x)
    else:
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        fn_grad = _fn(impl, leaves[1], leaves[2], padding, relu)
        upstream = torch.randn(fn_grad(leaves[0]).shape, generator=g).to(device, dtype)

        def step():
            fn_grad(leaves[0]).backward(upstream)
            for t in leaves:
                t.grad = None

    return synchronized(step, device)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize(("device", "impl"), list(_impls()))
@pytest.mark.parametrize("layer", list(FCN8S_LAYERS))
def test_fcn8s_layer(benchmark, layer, device, impl, mode):
    if impl == "onednn-fused" and mode != "fwd":
        pytest.skip("oneDNN's fused conv+ReLU op has no backward")
    step = _layer_step(layer, device, impl, mode)
    step()
    benchmark.group = f"conv+relu {device} {layer} {mode}"
    benchmark.extra_info["peak_extra_MB"] = (peak_extra_bytes(step, device) or 0) / 2**20
    benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layer", list(FCN8S_LAYERS))
def test_fcn8s_layer_interleaved(benchmark, layer, device, mode):
    """fcnkern's kernels against eager F.relu(F.conv2d), alternating round by round (see
    fcnkern.benchmarking.run_interleaved): the per-layer speed-ups without the drift of a shared machine."""
    _run_interleaved(benchmark, layer, device, mode, FCN8S_LAYERS, 1, f"conv+relu {device} {layer} {mode} interleaved")


def _run_interleaved(benchmark, layer, device, mode, layers, batch, group):
    impls = ["fcnkern-cpu"] if device == "cpu" else ["fcnkern-triton", "fcnkern-cuda"]
    steps = {impl: _layer_step(layer, device, impl, mode, layers, batch) for impl in [*impls, "eager"]}
    benchmark.group = group
    run_interleaved(benchmark, steps, baseline="eager")


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layer", list(NARROW_LAYERS))
def test_narrow_layer_interleaved(benchmark, layer, device, mode):
    """The main job's width-1/8 layers, batch 8, interleaved with eager as above: on the CPU these take the
    register-blocked direct kernels (8-64 channels), not the GEMMs of the full-width network."""
    group = f"conv+relu {device} narrow {layer} {mode} interleaved"
    _run_interleaved(benchmark, layer, device, mode, NARROW_LAYERS, NARROW_BATCH, group)


def _with_env(env: dict[str, str], step):
    def run():
        with mock.patch.dict(os.environ, env):
            return step()

    return run


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("layer", list(NARROW_LAYERS))
def test_narrow_layer_bf16_cpu_interleaved(benchmark, layer, mode):
    """The main job's layers in bf16 on the CPU (what ``fcnkern train --amp bf16`` runs), interleaved with eager bf16
    (oneDNN, on AVX512-BF16 where the CPU has it): fcnkern's kernels as they choose (``fcnkern-cpu``: the blocked
    layers on AVX512-BF16 dot products where the CPU has them) and with ``FCNKERN_CONV_BF16_DOT=0``
    (``fcnkern-cpu-fp32-math``: every product in fp32, as before the dot kernels), all three alternating."""
    steps = {
        "fcnkern-cpu": _layer_step(layer, "cpu", "fcnkern-cpu", mode, NARROW_LAYERS, NARROW_BATCH, torch.bfloat16),
        "fcnkern-cpu-fp32-math": _with_env(
            {"FCNKERN_CONV_BF16_DOT": "0"},
            _layer_step(layer, "cpu", "fcnkern-cpu", mode, NARROW_LAYERS, NARROW_BATCH, torch.bfloat16),
        ),
        "eager": _layer_step(layer, "cpu", "eager", mode, NARROW_LAYERS, NARROW_BATCH, torch.bfloat16),
    }
    benchmark.group = f"conv+relu cpu bf16 narrow {layer} {mode} interleaved"
    run_interleaved(benchmark, steps, baseline="eager")
