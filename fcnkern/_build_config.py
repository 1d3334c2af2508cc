"""Sources and compiler flags of the C++/CUDA extension, shared by setup.py (ahead-of-time build) and the
just-in-time loader in ``fcnkern._ext``. Imports nothing but the standard library, so setup.py can load it by path
before fcnkern is installed."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

EXTENSION_NAME = "fcnkern._C"
CPP_SOURCES = (
    "ops.cpp",
    "large_block_cache.cpp",
    "cross_entropy_cpu.cpp",
    "upsample_cpu.cpp",
    "upsample_learned_cpu.cpp",
    "conv_relu_cpu.cpp",
    "conv_relu_winograd_cpu.cpp",
    "conv_relu_blocked_cpu.cpp",
    "cpu_rows.cpp",
    "upsample_ce_cpu.cpp",
)
CUDA_SOURCES = (
    "cross_entropy_cuda.cu",
    "upsample_cuda.cu",
    "upsample_ce_cuda.cu",
    "conv_relu_cuda.cu",
    "cuda_ops.cpp",  # their dispatcher registration, host-compiled (see cuda_ops.h)
)
# sm_80 (A100) and sm_90 (H100/H200) SASS, plus sm_90 PTX so that newer GPUs can JIT it.
CUDA_ARCH_LIST = "8.0;9.0+PTX"

CXX_FLAGS = ["-O3", "-fopenmp", "-fno-math-errno"]
# --expt-relaxed-constexpr: device code uses std::numeric_limits (torch adds it too; stated here so nothing
# depends on that default).
NVCC_FLAGS = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr", "-DFCNKERN_WITH_CUDA"]
LINK_FLAGS = ["-fopenmp"]


def source_dir() -> Path:
    """Folder of the C++/CUDA sources: ``fcnkern/csrc`` in an installed wheel, ``cpp/`` in a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "csrc", here.parent / "cpp"):
        if (candidate / "ops.cpp").is_file():
            return candidate
    raise FileNotFoundError(f"fcnkern's C++ sources are neither in {here / 'csrc'} nor in {here.parent / 'cpp'}")


def cuda_home() -> Path:
    """The CUDA toolkit's folder: CUDA_HOME, else CUDA_PATH, else /usr/local/cuda."""
    return Path(os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda")


def cuda_build_reason(torch_cuda_version: str | None) -> str | None:
    """Why the CUDA part cannot be built here, or None when it can (a CUDA build of torch and nvcc present)."""
    if os.environ.get("FCNKERN_NO_CUDA", "0") == "1":
        return "FCNKERN_NO_CUDA=1 is set"
    if torch_cuda_version is None:
        return "torch is a CPU-only build"
    if shutil.which("nvcc") is None and not (cuda_home() / "bin" / "nvcc").is_file():
        return "nvcc was not found (set CUDA_HOME)"
    return None


def extra_include_dirs() -> list[str]:
    """CUDA 13 wheels of torch keep cuBLAS/cuSPARSE headers (which ATen's CUDA headers include) in
    site-packages/nvidia/cu13/include rather than in the toolkit."""
    import sysconfig

    found = []
    for base in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        inc = Path(base) / "nvidia" / "cu13" / "include"
        if inc.is_dir():
            found.append(str(inc))
    return found
