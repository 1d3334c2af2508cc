"""The compiled parts exist: the C++ extension's CUDA kernels were compiled, linked and registered wherever nvcc
and a CUDA build of torch are present, and every launchable Triton config compiles for sm_80 and sm_90."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from fcnkern import _build_config, _ext

# Ops with CPU and CUDA kernels (conv2d_relu has no CUDA kernel yet: issue 3).
CPP_OPS = (
    "fcnkern::pixelwise_ce_fwd",
    "fcnkern::pixelwise_ce_bwd",
    "fcnkern::bilinear_upsample_crop",
    "fcnkern::bilinear_upsample_crop_bwd",
    "fcnkern::upsample_crop",
    "fcnkern::upsample_crop_bwd",
    "fcnkern::upsample_ce_fwd",
    "fcnkern::upsample_ce_bwd",
    "fcnkern::conv2d_relu",
    "fcnkern::conv2d_relu_bwd",
)


def test_cpu_kernels_registered():
    status = _ext.load()
    assert status.error is None, status.error
    for op in CPP_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU"), op


def test_cuda_kernels_compiled_linked_and_registered():
    reason = _build_config.cuda_build_reason(torch.version.cuda)
    if reason is not None:
        pytest.skip(f"the CUDA part cannot be built here: {reason}")
    status = _ext.load()
    assert status.error is None, status.error
    assert status.with_cuda, f"nvcc and a CUDA torch are present but the extension has no CUDA part ({status.origin})"
    for op in CPP_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op


def _compile_check_records(*options: str, archs: tuple[str, ...] = ("80", "90"), timeout: int = 1800) -> list[dict]:
    """The records of ``python -m fcnkern.kernels.compile_check [options] ARCH`` for each of ``archs``, one process
    per architecture side by side."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "fcnkern.kernels.compile_check", *options, arch],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for arch in archs
    ]
    records = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, stderr[-3000:]
        records += [json.loads(line) for line in stdout.splitlines()]
    return records


def test_every_triton_config_compiles_for_sm80_and_sm90():
    # One process per architecture, side by side: about 8 minutes each on this 2-core machine.
    records = _compile_check_records()
    if os.environ.get("FCNKERN_COMPILE_RECORDS"):  # keep the table (registers, stack) for bench/results
        with open(os.environ["FCNKERN_COMPILE_RECORDS"], "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    kernels = {r["kernel"] for r in records}
    assert len(records) == 2 * len(kernels) and len(kernels) >= 84 + 74 + 226 + 74  # CE, conv, upsample, head
    assert any(k.startswith("head_") for k in kernels)
    assert {r["cc"] for r in records} == {80, 90}
    assert all(isinstance(r["registers"], int) and 0 < r["registers"] <= 255 for r in records)
    arrays = [r["kernel"] for r in records if r["local_memory"]]
    assert not arrays, f"kernels declaring local arrays in their PTX: {arrays[:3]}"
    # Register spills (the cubin's stack frame). Compiled without a launch's argument hints (the variant for
    # misaligned tensors), the implicit-GEMM conv and learned-upsampling kernels run at 255 registers and spill in
    # most configs on triton 3.6 and 3.8 alike (bench/results/compile/; the conv kernels as FCN-8s's layers launch
    # them are checked spill-free below), and so do some fp64 (gradcheck-only) variants; some fused-head configs
    # spill 8-40 bytes (triton 3.8). Everything else must stay spill-free.
    may_spill = ("conv_", "upsample_fwd_", "upsample_dgrad_", "upsample_wgrad_")
    spilling = [
        (r["kernel"], r["cc"], r["stack_bytes"])
        for r in records
        if r["stack_bytes"]
        and not r["kernel"].startswith(may_spill)
        and "_fp64_" not in r["kernel"]
        and not (r["kernel"].startswith("head_") and r["stack_bytes"] <= 64)
    ]
    assert not spilling, f"kernels spilling registers (kernel, cc, stack bytes): {spilling[:5]}"
    # Conv kernels and the learned upsampling's tensor-core variants, in fp16, bf16 and TF32, must run on tensor
    # cores: mma.sync on sm_80, wgmma on sm_90.
    low_precision = ("_fp16_", "_bf16_", "_tf32_")
    tensor_core = [
        r
        for r in records
        if (r["kernel"].startswith("conv_") or (r["kernel"].startswith("upsample_") and "_dot_" in r["kernel"]))
        and any(t in r["kernel"] for t in low_precision)
    ]
    assert any(r["kernel"].startswith("upsample_") for r in tensor_core)
    assert tensor_core
    missing = [r["kernel"] for r in tensor_core if not (r["mma"] if r["cc"] == 80 else r["wgmma"])]
    assert not missing, f"no tensor-core instructions in {missing[:5]}"


# FCN-8s layers whose channel counts are multiples of 16 on both sides: full tiles, aligned strides.
_WIDE_CONV_LAYERS = ("conv1_2", "conv2_1", "conv3_2", "conv4_1", "conv5_1", "fc6", "fc7")


def test_fcn_conv_launches_pipeline_on_tensor_cores():
    """The conv + ReLU kernels as a GPU launch for FCN-8s's layers specialises them (compile_check --launched: each
    pointer and stride divisible by 16 marked so, unit strides constant), bf16 and TF32, sm_80 and sm_90. For every
    layer with channel counts that are multiples of 16, the forward, dgrad and wgrad must copy their operands with
    cp.async in a pipelined loop (at least two stages' worth of copies in the PTX: an unpipelined loop has one),
    run on tensor cores (mma.sync / wgmma) and spill nothing. fc7's forward, a 1 x 1 kernel, failed all of that
    until its weight's unit strides were made 0 (fcnkern.conv_relu._weight_channels_last)."""
    records = _compile_check_records("--launched-conv")  # the conv kernels only: about half the compiles
    assert {r["cc"] for r in records} == {80, 90}
    assert all(0 < r["registers"] <= 255 for r in records)
    wide = [r for r in records if any(f"_{layer}_" in r["kernel"] for layer in _WIDE_CONV_LAYERS)]
    for kind in ("fwd", "dgrad", "wgrad"):
        for dtype in ("bfloat16", "float32"):
            assert any(r["kernel"].startswith(f"conv_{kind}_") and r["kernel"].endswith(dtype) for r in wide)
    bad = [
        (r["kernel"], r["cc"], r["cp_async"], r["stack_bytes"])
        for r in wide
        if r["cp_async"] < 24 or r["stack_bytes"] > 0 or not (r["wgmma"] if r["cc"] == 90 else r["mma"])
    ]
    assert not bad, f"(kernel, cc, cp.async copies, spill bytes) not pipelined on tensor cores: {bad}"


def test_triton_kernels_compile_with_integer_arguments_of_one():
    """At launch Triton turns an int argument equal to 1 (N = 1, C = 1, a unit stride) into a constexpr Python int;
    each kernel must compile that way too (``N.to(...)`` on one broke the fused head at batch 1 on the GPU)."""
    records = _compile_check_records("--ints-of-one", archs=("90",), timeout=900)
    kernels = {r["kernel"].split("_")[0] for r in records}
    assert {"ce", "conv", "upsample", "bilinear", "head"} <= kernels, kernels
    assert all(r["kernel"].endswith("_ints1") for r in records)


def test_cpu_block_cache_recycles_and_empties():
    """Big CPU gradients come from a recycled block cache; empty_cache() hands the blocks back."""
    import fcnkern

    big = torch.randn(2, 21, 300, 300, requires_grad=True)  # a 15 MB gradient: above the 8 MiB cache threshold
    t = torch.randint(0, 21, (2, 300, 300))
    fcnkern.pixelwise_cross_entropy(big, t, backend="cpu").backward()
    grad_ptr = big.grad.data_ptr()
    big.grad = None  # the block goes back to the cache ...
    assert _ext.load().module.cached_bytes() > 0
    fcnkern.pixelwise_cross_entropy(big, t, backend="cpu").backward()
    assert big.grad.data_ptr() == grad_ptr  # ... and is handed out again
    big.grad = None
    assert fcnkern.empty_cache() > 0 and _ext.load().module.cached_bytes() == 0
