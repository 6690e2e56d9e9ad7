"""carfast's CUDA kernels (csrc/cuda/*.cu) compiled for the CPU and called like the torch binding calls them.

The emulation (csrc/cuda/emu, overview in csrc/cuda/README.md) runs the very .cu files nvcc builds: this
package reads each one, rewrites the two constructs a C++ compiler cannot parse (``translate``, in
``sources``), compiles it with g++ against the shim headers of csrc/cuda/emu/include, links the result with
the emulator's runtime and C API into a shared library (``build``, cached by the hash of every input, in
``compiler``), and loads it with ctypes (``Emulator``, in ``emulator``). The launchers choose their grids,
blocks and shared memory as on the GPU; the emulator checks those launches as the driver does and runs
every block, thread by thread.

``Emulator``'s op methods mirror csrc/cuda/bindings.cpp: the same input conversions, output layouts and
launcher calls, outputs and workspaces filled with a poison byte first (so anything the kernels leave
unwritten shows). ``mutated`` and ``run_isolated`` (in ``mutants``) serve the tests that break a kernel on
purpose: a broken kernel may also crash or hang, so it runs in a forked child.

Everything is importable from the package itself: ``import cuda_emu; cuda_emu.Emulator(cuda_emu.build())``.
"""
from .compiler import CXXFLAGS, INCLUDES, build, cache_dir, find_cxx, unavailable_reason
from .emulator import (
    H100_SHARED_OPTIN,
    H100_SMS,
    KERNEL_DTYPE,
    ORDERS,
    POISON,
    Call,
    Emulator,
    EmulatorError,
    conv_geometry,
    poisoned,
)
from .mutants import Outcome, mutated, run_isolated
from .sources import CUDA_DIR, EMU_DIR, HEADERS, KERNEL_FILES, ROOT, UNITS, translate

__all__ = [
    "CUDA_DIR", "CXXFLAGS", "EMU_DIR", "H100_SHARED_OPTIN", "H100_SMS", "HEADERS", "INCLUDES", "KERNEL_DTYPE",
    "KERNEL_FILES", "ORDERS", "POISON", "ROOT", "UNITS", "Call", "Emulator", "EmulatorError", "Outcome", "build",
    "cache_dir", "conv_geometry", "find_cxx", "mutated", "poisoned", "run_isolated", "translate",
    "unavailable_reason",
]
