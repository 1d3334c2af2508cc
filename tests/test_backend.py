"""Backend registry: listing, automatic choice, explicit choice by argument, context manager and environment."""

from __future__ import annotations

import pytest
import torch

import fcnkern
from fcnkern.backend import BackendUnavailableError, resolve


def test_backends_lists_all_four_with_reasons():
    listing = fcnkern.backends()
    assert list(listing) == ["triton", "cuda", "cpu", "torch"]
    assert listing["torch"].available
    for info in listing.values():
        assert info.reason and (info.available == (info.reason == "available"))
    if not torch.cuda.is_available():
        assert not listing["cuda"].available and "CUDA" in listing["cuda"].reason


def test_auto_choice_on_cpu_prefers_the_cpp_extension():
    expected = "cpu" if fcnkern.backend_info("cpu").available else "torch"
    assert resolve(None, "cpu") == expected


def test_explicit_argument_beats_context_and_environment(monkeypatch):
    monkeypatch.setenv("FCNKERN_BACKEND", "cpu")
    with fcnkern.use_backend("torch"):
        assert resolve("torch", "cpu") == "torch"
        assert resolve(None, "cpu") == "torch"  # context beats environment
        with fcnkern.use_backend(None):
            # an inner automatic block defers to the environment again
            if fcnkern.backend_info("cpu").available:
                assert resolve(None, "cpu") == "cpu"
            else:
                with pytest.raises(BackendUnavailableError):
                    resolve(None, "cpu")


def test_environment_variable_selects(monkeypatch):
    monkeypatch.setenv("FCNKERN_BACKEND", "torch")
    assert resolve(None, "cpu") == "torch"
    monkeypatch.setenv("FCNKERN_BACKEND", "auto")
    assert resolve(None, "cpu") in ("cpu", "torch")


def test_context_manager_nests_and_restores():
    with fcnkern.use_backend("torch"):
        with fcnkern.use_backend("cpu" if fcnkern.backend_info("cpu").available else "torch"):
            pass
        assert resolve(None, "cpu") == "torch"
    assert resolve(None, "cpu") in ("cpu", "torch")


def test_unknown_backend_raises():
    with pytest.raises(ValueError, match="unknown backend"):
        resolve("cudnn", "cpu")
    with pytest.raises(ValueError, match="unknown backend"), fcnkern.use_backend("fast"):
        pass


def test_unavailable_backend_named_explicitly_raises_with_reason(monkeypatch):
    with pytest.raises(BackendUnavailableError, match="cuda backend runs on CUDA tensors"):
        resolve("cuda", "cpu")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
            resolve("triton", "cpu")


def test_explicit_backend_does_not_fall_back(monkeypatch):
    """A benchmark naming a backend must run that backend or fail, never silently run another."""
    monkeypatch.setenv("FCNKERN_BACKEND", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError):
            fcnkern.pixelwise_cross_entropy(torch.randn(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))


def test_auto_choice_on_cuda_is_the_fastest_measured_per_op(monkeypatch):
    """On CUDA tensors the automatic choice follows the H100 measurements (cuDNN's convolution beats fcnkern's;
    the Triton learned upsampling beats the C++ one; the C++ kernels lead elsewhere). Checked without a GPU by
    declaring every backend runnable."""
    from fcnkern import backend as b

    monkeypatch.setattr(b, "_device_problem", lambda name, device: None)
    monkeypatch.setattr(b, "_unavailable_reason", lambda name: None)
    monkeypatch.delenv("FCNKERN_BACKEND", raising=False)
    assert b.resolve(None, "cuda", "conv2d_relu") == "torch"
    assert b.resolve(None, "cuda", "upsample_crop") == "triton"
    for op in ("pixelwise_cross_entropy", "bilinear_upsample_crop", "upsample_cross_entropy"):
        assert b.resolve(None, "cuda", op) == "cuda"
    assert b.resolve("triton", "cuda", "conv2d_relu") == "triton"  # an explicit choice still runs fcnkern's kernel
    assert b.resolve(None, "cpu", "conv2d_relu") == "cpu"
