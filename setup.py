"""Build script: packages fcnkern, its Triton kernels (``kernels/`` -> ``fcnkern.kernels``) and its C++/CUDA sources
(``cpp/`` -> ``fcnkern/csrc``), and compiles the C++/CUDA extension ahead of time when torch is importable at
build time (``pip install --no-build-isolation``). Without torch at build time the extension is compiled on
first use instead (see fcnkern/_ext.py)."""

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_fcnkern_build_config", ROOT / "fcnkern" / "_build_config.py")
cfg = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cfg)


def extension_modules():
    if os.environ.get("FCNKERN_NO_EXTENSION", "0") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print(
            "fcnkern: torch is not importable at build time; the C++ extension will be compiled on first use",
            file=sys.stderr,
        )
        return [], {}
    sources = [f"cpp/{name}" for name in cfg.CPP_SOURCES]
    kwargs = dict(
        name=cfg.EXTENSION_NAME,
        extra_compile_args={"cxx": list(cfg.CXX_FLAGS), "nvcc": list(cfg.NVCC_FLAGS)},
        extra_link_args=list(cfg.LINK_FLAGS),
        include_dirs=[str(ROOT / "cpp")],
    )
    no_cuda = cfg.cuda_build_reason(torch.version.cuda)
    if no_cuda is None:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", cfg.CUDA_ARCH_LIST)
        kwargs["extra_compile_args"]["cxx"].append("-DFCNKERN_WITH_CUDA")
        kwargs["include_dirs"] += cfg.extra_include_dirs()
        ext = CUDAExtension(sources=sources + [f"cpp/{name}" for name in cfg.CUDA_SOURCES], **kwargs)
    else:
        print(f"fcnkern: building the CPU part of the extension only ({no_cuda})", file=sys.stderr)
        del kwargs["extra_compile_args"]["nvcc"]
        ext = CppExtension(sources=sources, **kwargs)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()

setup(
    packages=["fcnkern", "fcnkern.kernels", "fcnkern.csrc"],
    package_dir={"fcnkern.kernels": "kernels", "fcnkern.csrc": "cpp"},
    package_data={"fcnkern.csrc": ["*.cpp", "*.cu", "*.h", "*.inc"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
