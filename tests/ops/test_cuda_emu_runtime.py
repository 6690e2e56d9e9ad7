"""The CPU emulation of the CUDA kernels itself: its runtime's semantics, faults and conversions.

The emulation (tests/ops/cuda_emu/, csrc/cuda/emu; how it works and what it cannot show: csrc/cuda/README.md)
compiles the very .cu files nvcc builds with g++ against a shim. Checked here, with the test kernels of
csrc/cuda/emu/selftest.cu: barrier and 32-lane warp collective semantics under every schedule, the faults
it reports, the dynamic shared memory opt-in, the rounding of the half / bfloat16 conversions, that fmaf
is fused; and that every .cu file and launcher is part of the emulation, and the source translation keeps
every line. Skips, with the reason, only where no C++ compiler (or no Linux) is available.
"""
from __future__ import annotations

import glob
import math
import os
import re

import cuda_emu
import pytest
import torch

_WHY = cuda_emu.unavailable_reason()
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"CUDA emulation unavailable: {_WHY}")



@pytest.mark.parametrize("order", ["forward", "reverse", "shuffled"])
def test_emulator_barrier_and_warp_collectives(lib, order):
    emu = cuda_emu.Emulator(lib, order=order, seed=3)
    n = 96
    code, out = emu.selftest(0, n, 3 * n)                 # each thread reads its neighbour's write
    t = torch.arange(n)
    expect = torch.cat([1000 * b + (t + 1) % n for b in range(3)])
    assert code == 0 and torch.equal(out, expect), emu.message()
    code, out = emu.selftest(1, n, 3 * n)                 # the same without the barrier: stale reads
    assert code == 0 and not torch.equal(out, expect)
    code, out = emu.selftest(3, 128, 128)                 # threads that exit do not hold the barrier
    assert code == 0 and torch.equal(out[:64], 63 - torch.arange(64)) and (out[64:] == -1).all()

    code, out = emu.selftest(2, n, 12 * n)
    assert code == 0, emu.message()
    out = out.view(n, 12)
    for k in range(5):                                    # lane i gets lane i ^ 2^k's value
        src = t ^ (1 << k)
        assert torch.equal(out[:, k], 7 * src + 3) and torch.equal(out[:, 5 + k], src)
    pred = (t % 3 == 0).view(-1, 32)
    ballot = (pred.long() << torch.arange(32)).sum(1)
    assert torch.equal(out[:, 10], pred.any(1).long().repeat_interleave(32))
    assert torch.equal(out[:, 11], ballot.repeat_interleave(32))


@pytest.mark.parametrize("which, threads, code, message", [
    (4, 64, 719, r"different __syncthreads \(selftest.cu:\d+ and selftest.cu:\d+\)"),
    (5, 64, 719, r"deadlock, no thread can go on: 32 thread\(s\) wait at __syncthreads"),
    (6, 32, 719, r"thread 5 exited while the other lanes of its warp wait"),
    (7, 32, 716, r"float4 load at a misaligned address"),
    (8, 32, 700, r"wrote shared memory at byte 128, past the 128 bytes"),
    (9, 32, 9, r"block \(2048, 1, 1\) is not a valid block"),
], ids=["divergent_barrier", "deadlock", "exited_lane", "misaligned_float4", "shared_overflow", "2048_threads"])
def test_emulator_reports_faults(emu, which, threads, code, message):
    got, _ = emu.selftest(which, threads, 4096)
    assert got == code, emu.message()
    assert re.search(message, emu.message()), emu.message()


def test_emulator_shared_memory_opt_in(emu):
    """64 KiB of dynamic shared memory: rejected as by the driver, then launched after cudaFuncSetAttribute."""
    code, _ = emu.selftest(10, 32, 32)
    assert code == 1 and "no cudaFuncSetAttribute opt-in" in emu.message()
    code, out = emu.selftest(11, 32, 32)
    assert code == 0 and torch.equal(out, (torch.arange(32) + 1) % 32), emu.message()


def test_emulator_conversions_round_as_the_gpu(emu):
    """float16 / bfloat16 conversions: exact one way, round to nearest even the other, as torch (and the GPU)."""
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    for kind, dtype in ((1, torch.float16), (3, torch.bfloat16)):
        h = bits.view(dtype)
        got, want = emu.convert(kind, h), h.float()
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got[~want.isnan()], want[~want.isnan()])
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(20000, generator=g) * 10.0 ** torch.randint(-9, 6, (20000,), generator=g),
                   torch.randint(-2 ** 31, 2 ** 31 - 1, (20000,), generator=g, dtype=torch.int64).to(torch.int32)
                   .view(torch.float32),                                            # every exponent
                   torch.tensor([0.0, -0.0, 65504.0, 65519.99, 65520.0, -65520.0, 2.0 ** -24, 2.0 ** -25,
                                 3 * 2.0 ** -26, 2.0 ** -14 - 2.0 ** -25, 1.0 + 2.0 ** -11, 1.0 + 3 * 2.0 ** -11,
                                 1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8, 3.4e38, math.inf, -math.inf, math.nan])])
    for kind, dtype in ((0, torch.float16), (2, torch.bfloat16)):
        # every rounding decision: each midpoint between neighbouring finite values (a tie) and the floats
        # just below and above it, both signs, subnormals and the overflow threshold included
        v = bits[2 ** 15:].view(dtype).double()                       # 0 ... inf, then NaNs
        v = torch.cat([v[~v.isinf() & ~v.isnan()], torch.tensor([65536.0 if kind == 0 else 2.0 ** 128])])
        mid = ((v[:-1] + v[1:]) / 2).float()                           # exact: one more bit than the type
        ties = torch.cat([mid, mid.nextafter(torch.tensor(-math.inf)), mid.nextafter(torch.tensor(math.inf))])
        xs = torch.cat([x, ties, -ties])
        got, want = emu.convert(kind, xs).float(), xs.to(dtype).float()
        nan = want.isnan()
        assert torch.equal(got.isnan(), nan)
        assert torch.equal(got[~nan], want[~nan]), (xs[~nan][got[~nan] != want[~nan]][:5], kind)


def test_emulator_fma_is_fused(emu):
    """fmaf and __fmaf_rn round once; __fadd_rn(__fmul_rn()) twice (no contraction behind the kernels' back)."""
    a = torch.tensor([1.0 + 2.0 ** -12, 1.0 + 2.0 ** -23, 3.0])
    c = torch.tensor([-(1.0 + 2.0 ** -11), -1.0, 1.0])
    exact = (a.double() * a.double() + c.double()).float()
    assert torch.equal(emu.fma(0, a, a, c), exact) and torch.equal(emu.fma(1, a, a, c), exact)
    separate = emu.fma(2, a, a, c)
    assert torch.equal(separate, a * a + c) and not torch.equal(separate, exact)


def test_every_kernel_source_and_launcher_is_emulated():
    """A new .cu file or launcher must join the emulation (tests/ops/cuda_emu/sources.py, csrc/cuda/emu/api.cpp)."""
    on_disk = {os.path.basename(p) for p in glob.glob(os.path.join(cuda_emu.CUDA_DIR, "*.cu"))}
    assert on_disk == set(cuda_emu.KERNEL_FILES), "add the new .cu to cuda_emu.KERNEL_FILES and test it here"
    with open(os.path.join(cuda_emu.CUDA_DIR, "kernels.h")) as f:
        declared = re.findall(r"^(?:cudaError_t|size_t|ClosedFormPlan)\s+(\w+)\(", f.read(), re.M)
    with open(os.path.join(cuda_emu.EMU_DIR, "api.cpp")) as f:
        api = f.read()
    assert declared and all(f"carfast::cuda::{name}(" in api for name in declared)


def test_translate_keeps_every_line():
    src = ("template <int B> __global__ void k(int* p, int n) {\n  extern __shared__ float4 s[];\n}\n"
           "void go(int* p) {\n  // k<1><<<grid, block>>>(p, 1): a comment stays as it is\n"
           "  k<4><<<dim3(2, 3), 64>>>(p,\n      f(1, 2));\n  ns::other<<<1, 32, 0, stream>>>();\n}\n")
    out = cuda_emu.translate(src, "/x/y.cu")
    lines = out.splitlines()
    assert lines[0] == '#line 1 "/x/y.cu"' and len(lines) == len(src.splitlines()) + 1
    assert "float4* s = ::carfast_emu::dynamic_shared<float4>();" in lines[2]
    assert "<<<grid, block>>>" in lines[5]
    assert lines[6] == ('  ::carfast_emu::launch(k<4>, ::carfast_emu::LaunchConfig(__FILE__, __LINE__, "k<4>", '
                        'dim3(2, 3), 64), p,')
    assert lines[7] == "      f(1, 2));"
    assert lines[8] == ('  ::carfast_emu::launch(ns::other, ::carfast_emu::LaunchConfig(__FILE__, __LINE__, '
                        '"ns::other", 1, 32, 0, stream));')
