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

CPP_OPS = ("fcnkern::pixelwise_ce_fwd", "fcnkern::pixelwise_ce_bwd")


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


def test_every_triton_config_compiles_for_sm80_and_sm90():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-m", "fcnkern.kernels.compile_check", "80", "90"],
        env=env, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(line) for line in out.stdout.splitlines()]
    kernels = {r["kernel"] for r in records}
    assert len(records) == 2 * len(kernels) and len(kernels) >= 96
    assert {r["cc"] for r in records} == {80, 90}
    spilling = [r for r in records if r["local_memory"]]
    assert not spilling, f"kernels using local memory (spills): {spilling[:3]}"


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
