#!/usr/bin/env python
"""Build and install solq_d2 with its C++/CUDA extension ``solq_d2._C``.

* The C++ (CPU) sources under ``csrc/`` are always compiled.
* The CUDA sources (``csrc/**/*.cu``) are added when ``torch.cuda.is_available()`` or
  ``FORCE_CUDA=1``; ``TORCH_CUDA_ARCH_LIST`` selects the GPU architectures (see INSTALL.md).
* Install with ``pip install --no-build-isolation -e .`` so the extension is built against the
  torch you already have (an isolated build would pull another torch and break the ABI).
"""
import glob
import os
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def get_version():
    for line in (ROOT / "solq_d2" / "__init__.py").read_text().splitlines():
        if line.startswith("__version__"):
            return line.split("=")[1].strip().strip("\"'")
    raise RuntimeError("no __version__ in solq_d2/__init__.py")


def cuda_include_dirs():
    """CUDA math-library headers shipped inside torch's pip wheels (nvidia/cu*/include).

    ATen/cuda/CUDAContext.h includes cusparse.h/cublas_v2.h, which a bare toolkit install may
    lack; the wheels' nvidia packages have them.
    """
    try:
        import nvidia  # namespace package installed with CUDA builds of torch
    except ImportError:
        return []
    dirs = []
    for base in getattr(nvidia, "__path__", []):
        dirs += sorted(glob.glob(os.path.join(base, "cu*", "include")))
        dirs += sorted(glob.glob(os.path.join(base, "*", "include")))
    return [d for d in dirs if os.path.isfile(os.path.join(d, "cusparse.h"))][:1]


def get_extensions():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    csrc = ROOT / "csrc"
    sources = sorted(str(p.relative_to(ROOT)) for p in csrc.rglob("*.cpp"))
    cuda_sources = sorted(str(p.relative_to(ROOT)) for p in csrc.rglob("*.cu"))
    define_macros = []
    extra_compile_args = {"cxx": ["-O3", "-std=c++20"]}
    include_dirs = [str(csrc)]
    extension = CppExtension

    force_cuda = os.environ.get("FORCE_CUDA", "0") == "1"
    if (torch.cuda.is_available() and CUDA_HOME is not None) or force_cuda:
        if CUDA_HOME is None:
            raise RuntimeError(
                "FORCE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME (e.g. /usr/local/cuda)"
            )
        extension = CUDAExtension
        sources += cuda_sources
        define_macros += [("WITH_CUDA", None)]
        extra_compile_args["nvcc"] = ["-O3", "-std=c++20", "--expt-relaxed-constexpr"]
        extra_compile_args["nvcc"] += os.environ.get("NVCC_FLAGS", "").split()
        include_dirs += cuda_include_dirs()
        from torch.utils.cpp_extension import _get_cuda_arch_flags

        archs = sorted({f.split("code=")[-1] for f in _get_cuda_arch_flags() if "code=" in f})
        define_macros += [("SOLQ_D2_CUDA_ARCHS", '"' + ";".join(archs) + '"')]

    return [
        extension(
            "solq_d2._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args=extra_compile_args,
        )
    ]


def build_ext_cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(
    name="solq_d2",
    version=get_version(),
    description="SOLQ, SOIT and QueryInst as Detectron2 meta-architectures, with C++/CUDA "
    "deformable-attention kernels",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=find_packages(include=("solq_d2", "solq_d2.*")),
    install_requires=[
        line.split("#")[0].strip()
        for line in (ROOT / "requirements.txt").read_text().splitlines()
        if line.split("#")[0].strip()
    ],
    ext_modules=get_extensions(),
    cmdclass=build_ext_cmdclass(),
    zip_safe=False,
)
