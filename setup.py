"""Build script for carfast.

Install (after installing torch):  pip install --no-build-isolation -e .
(``--no-build-isolation`` lets the build see the torch you installed, so the compiled kernels match
it; pyproject.toml does not list torch as a build requirement on purpose.)
An sdist and a wheel, the same way:  python -m build --no-isolation  (``tools/check_wheel.sh`` builds them
with ``CARFAST_MARCH_NATIVE=0`` and installs the wheel into a fresh environment; the wheel's kernels
load with the torch it was built against.)

Compiled extensions, each optional; the package always installs and falls back to pure PyTorch:

* ``carfast._C``      the C++/OpenMP CPU kernels, from csrc/*.cpp and csrc/cpu/*.cpp.
* ``carfast._C_cuda`` the CUDA kernels, from csrc/cuda/*.cu (raw-pointer kernels, nvcc alone compiles
                      each) and csrc/cuda/bindings.cpp (their torch registration), with csrc/module.cpp
                      as its module init; built only with a CUDA build of torch and nvcc
                      (``$CUDA_HOME/bin/nvcc``) present. Compiled with -O3 for the architectures in
                      ``TORCH_CUDA_ARCH_LIST`` (torch's own variable, e.g. ``9.0`` for H100; unset, the
                      visible GPUs' or, with none visible, 9.0), on ``MAX_JOBS`` parallel jobs (default:
                      all cores; ninja, ``pip install ninja``, makes the jobs parallel).

An extension that is skipped, or fails to compile, prints one line ``carfast: skipping ...`` with
the reason and the fix (pip shows it with ``pip install -v``); at run time
``python -c "import carfast; print(carfast.backends())"`` lists the backends and why any is unavailable.

Environment switches:

* ``CARFAST_NO_EXT_BUILD=1``  build no extension (pure-PyTorch install, or to mimic a machine
                              without a compiler).
* ``CARFAST_MARCH_NATIVE=0``  compile without ``-march=native``. Native is the default because
                              carfast is built from source on the machine that runs it; turn it off
                              to build a binary that runs on other x86-64 CPUs.
"""
from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
REBUILD = "fix: install torch, then rebuild with `pip install --no-build-isolation -e .`"


# pip runs this file more than once (metadata, then build); say things only where it builds
_METADATA_ONLY = len(sys.argv) > 1 and sys.argv[1] in ("egg_info", "dist_info")


def _skip(ext: str, reason: str, fix: str) -> None:
    if not _METADATA_ONLY:
        print(f"carfast: skipping extension {ext}: {reason}; {fix}", flush=True)


def _sources(*patterns: str) -> list[str]:
    # relative paths: setuptools rejects absolute source paths
    out: list[str] = []
    for pattern in patterns:
        out += sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))
    return out


def _cuda_extension(torch, cpp_extension):
    """The carfast._C_cuda extension, or None (after one ``carfast: skipping`` line saying why)."""
    ext = "carfast._C_cuda"
    cuda_sources = _sources("csrc/cuda/*.cu", "csrc/cuda/*.cpp")
    if not cuda_sources:
        _skip(ext, "no CUDA sources under csrc/cuda", "fix: restore csrc/cuda/ from the repository")
        return None
    if torch.version.cuda is None:
        _skip(ext, f"torch {torch.__version__} is a CPU-only build",
              "fix: install a CUDA build of torch, then rebuild with `pip install --no-build-isolation -e .` "
              "(the CPU and torch backends work meanwhile)")
        return None
    nvcc = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc") if cpp_extension.CUDA_HOME else None
    if nvcc is None or shutil.which(nvcc) is None:
        _skip(ext, f"nvcc not found (CUDA_HOME={cpp_extension.CUDA_HOME})",
              f"fix: install the CUDA toolkit matching torch.version.cuda={torch.version.cuda} and set CUDA_HOME "
              "to it, then rebuild")
        return None
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # torch would take the visible GPUs' architectures; with none it has nothing to build for
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
        if not _METADATA_ONLY:
            print("carfast: TORCH_CUDA_ARCH_LIST is unset and no GPU is visible: building carfast._C_cuda for "
                  "9.0 (H100); set TORCH_CUDA_ARCH_LIST for other GPUs", flush=True)
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))  # ninja: every core
    include_dirs = [os.path.join(HERE, "csrc")]
    # CUDA builds of torch from PyPI ship the CUDA headers its own headers include (cuBLAS, cuSPARSE,
    # ...) in nvidia/cu<major>/include next to torch; a toolkit without them still builds then
    site_packages = os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__)))
    wheel_include = os.path.join(site_packages, "nvidia", f"cu{torch.version.cuda.split('.')[0]}", "include")
    if os.path.isdir(wheel_include):
        include_dirs.append(wheel_include)
    # csrc/cuda registers kernels for ops defined by csrc/ops.cpp in carfast._C; it must not repeat
    # TORCH_LIBRARY(carfast, ...). carfast/extensions.py imports _C first. csrc/module.cpp is compiled again
    # here, with TORCH_EXTENSION_NAME=_C_cuda (BuildExtension defines it), as this module's init.
    return cpp_extension.CUDAExtension(
        ext,
        cuda_sources + _sources("csrc/module.cpp"),
        include_dirs=include_dirs,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
    )


def _extensions():
    """(ext_modules, cmdclass); empty when nothing can be built."""
    if os.environ.get("CARFAST_NO_EXT_BUILD") == "1":
        for ext in ("carfast._C", "carfast._C_cuda"):
            _skip(ext, "CARFAST_NO_EXT_BUILD=1 is set", "fix: unset it and rebuild to get the compiled kernels")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as exc:  # torch missing or broken: install the pure-PyTorch package
        for ext in ("carfast._C", "carfast._C_cuda"):
            _skip(ext, f"torch is not importable at build time ({type(exc).__name__}: {exc})",
                  f"{REBUILD} (without --no-build-isolation the build cannot see torch)")
        return [], {}

    class BuildExtension(cpp_extension.BuildExtension):
        """torch's BuildExtension, but a failed extension is skipped with one line, not fatal."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # compiler missing, compile or link error
                msg = " ".join(str(exc).split())[:300]
                _skip(ext.name, f"compilation failed ({type(exc).__name__}: {msg})",
                      "fix: see the compiler output above (`pip install -v ...`), check that a C++17 "
                      "compiler is installed, then rebuild with `pip install --no-build-isolation -e .`")

    # No -std flag: torch's BuildExtension adds the standard its headers need (C++17 for torch 2.4,
    # C++20 for recent torch); the sources need C++17 at least.
    cxx = ["-O3"]
    ldflags: list[str] = []
    if sys.platform == "win32":
        cxx = ["/O2", "/openmp"]
    elif sys.platform == "darwin":
        pass  # Apple clang has no -fopenmp: the kernels build and run on one thread
    else:
        cxx.append("-fopenmp")
        ldflags.append("-fopenmp")  # links libgomp, the same soname torch loads
    if os.environ.get("CARFAST_MARCH_NATIVE", "1") != "0" and sys.platform != "win32":
        cxx.append("-march=native")  # built from source where it runs; CARFAST_MARCH_NATIVE=0 for portable

    ext_modules = [
        cpp_extension.CppExtension(
            "carfast._C",
            _sources("csrc/*.cpp", "csrc/cpu/*.cpp"),
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args={"cxx": cxx},
            extra_link_args=ldflags,
        )
    ]

    cuda_ext = _cuda_extension(torch, cpp_extension)
    if cuda_ext is not None:
        ext_modules.append(cuda_ext)
    return ext_modules, {"build_ext": BuildExtension}


def _licence() -> dict:
    """The licence metadata: an SPDX expression (PEP 639, setuptools >= 77), else the older free-text field."""
    import setuptools
    try:
        major = int(setuptools.__version__.split(".")[0])
    except ValueError:
        major = 0
    return {"license_expression": "BSD-3-Clause"} if major >= 77 else {"license": "BSD-3-Clause"}


def _readme() -> str:
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        return f.read()


ext_modules, cmdclass = _extensions()

setup(
    name="carfast",
    version="0.2.0",
    description="Score CNN filters by CAR: the accuracy lost when a filter is removed",
    long_description=_readme(),
    long_description_content_type="text/markdown",
    **_licence(),
    # carfast's licence, and the licence of the bundled pretrained ResNet weights (carfast/assets/README.md)
    license_files=["LICENSE", "carfast/assets/LICENSE.resnet-cifar10"],
    python_requires=">=3.9",
    packages=find_packages(include=["carfast*"]),
    package_data={"carfast": ["assets/*"]},
    include_package_data=True,
    # matplotlib draws the report's figures (``carfast demo`` / ``report``); it brings Pillow, which
    # decodes the JPEG training set for fine-tuning
    install_requires=["torch>=2.4", "numpy", "matplotlib"],
    extras_require={
        # torch-pruning: the Torch-Pruning integration's tests (pip resolves its torch requirement to the
        # torch already installed)
        "test": ["pytest", "pytest-benchmark", "ruff", "torch-pruning==1.6.1"],
        "torch-pruning": ["torch-pruning>=1.5"],
        "finetune": ["pillow"],
        "captum": ["captum"],
        "triton": ["triton"],
    },
    entry_points={"console_scripts": ["carfast = carfast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
