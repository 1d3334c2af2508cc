"""The CPU backend's GEMM library (oneDNN or MKL, FCNKERN_CPU_GEMM): each path gives PyTorch's results on the conv and
learned-upsampling kernels, on shapes where oneDNN really is used (inner dimensions of 128 and more, the shifted
3x3 path, forced); a bad setting is a clear error. Each library runs in its own process, since the choice is read
once per process. The register-blocked conv kernels, which use no GEMM, are off here."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

import fcnkern

pytestmark = pytest.mark.skipif(
    not fcnkern.backend_info("cpu").available, reason="the cpu backend (C++ extension) is unavailable here"
)

_PARITY = textwrap.dedent(
    """
    import os, torch, torch.nn.functional as F, fcnkern
    torch.manual_seed(0)
    os.environ["FCNKERN_CONV_BLOCKED"] = "0"
    print(fcnkern.cpu_gemm_library())

    def check(ours, ref, inputs):
        for t in inputs:
            t.grad = None
        out = ours()
        up = torch.randn_like(out)
        grads = torch.autograd.grad(out, inputs, up)
        rout = ref()
        rgrads = torch.autograd.grad(rout, inputs, up)
        for a, b in zip((out, *grads), (rout, *rgrads)):
            err = ((a - b).norm() / b.norm()).item()
            assert err < 2e-5, err

    for cin, cout, k, hw in ((160, 130, 3, 21), (256, 256, 3, 13), (300, 140, 1, 17), (7, 140, 5, 23)):
        os.environ["FCNKERN_CONV_SHIFTED"] = "all" if cin == 256 else ""
        x = torch.randn(2, cin, hw, hw + 2, dtype=torch.float64).float().requires_grad_()
        w = (torch.randn(cout, cin, k, k) / (cin * k * k) ** 0.5).requires_grad_()
        b = torch.randn(cout).requires_grad_()
        p = k // 2
        check(lambda: fcnkern.conv2d_relu(x, w, b, 1, p, backend="cpu"),
              lambda: F.relu(F.conv2d(x.double(), w.double(), b.double(), 1, p)).float(), (x, w, b))
    x = torch.randn(1, 140, 9, 11).requires_grad_()
    w = (torch.randn(140, 150, 4, 4) * 0.05).requires_grad_()
    check(lambda: fcnkern.upsample_crop(x, w, 2, (1, 1), (15, 19), backend="cpu"),
          lambda: F.conv_transpose2d(x.double(), w.double(), stride=2)[:, :, 1:16, 1:20].float(), (x, w))
    print("ok")
    """
)


def _run(code: str, library: str, in_place: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "FCNKERN_CPU_GEMM": library, "FCNKERN_ONEDNN_IN_PLACE": in_place}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize(
    ("library", "in_place"),
    [("onednn", ""), ("onednn", "0"), ("mkl", "")],
    ids=["onednn-in-place", "onednn-fresh-product", "mkl"],
)
def test_each_library_matches_pytorch(library, in_place):
    """oneDNN in place (at::native::mkldnn_matmul where this torch exports it) and through the op's fresh product
    (FCNKERN_ONEDNN_IN_PLACE=0, the path for a torch without it), and MKL."""
    result = _run(_PARITY, library, in_place)
    if library == "onednn" and "has no oneDNN matmul" in result.stderr:
        pytest.skip("this torch has no oneDNN matmul (mkldnn::_linear_pointwise): MKL is the only library")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.split()
    assert lines[0] == library and lines[-1] == "ok"


def test_bad_setting_is_a_clear_error():
    # stride 2: im2col + GEMM (a stride-1 layer this small takes the register-blocked kernels, no GEMM)
    code = (
        "import torch, fcnkern; "
        "fcnkern.conv2d_relu(torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3), stride=2, backend='cpu')"
    )
    result = _run(code, "blas")
    assert result.returncode != 0
    assert "FCNKERN_CPU_GEMM must be 'mkl' or 'onednn', got 'blas'" in result.stderr
