"""Fixtures of the CUDA kernels' CPU emulation (tests/ops/cuda_emu), shared by its test files: ``lib``, the
emulated kernels built once per module (cached across runs by the hash of their sources), and ``emu``, an
``Emulator`` on it. Requested only by the ``test_cuda_emu_*`` files, which skip when no C++ compiler is
there."""
from __future__ import annotations

import cuda_emu
import pytest


@pytest.fixture(scope="module")
def lib() -> str:
    return cuda_emu.build()


@pytest.fixture
def emu(lib) -> cuda_emu.Emulator:
    return cuda_emu.Emulator(lib)
