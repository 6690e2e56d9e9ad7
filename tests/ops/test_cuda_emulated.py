"""The CUDA kernels (csrc/cuda/*.cu) run on the CPU, on every test run, against the plain-PyTorch references.

No GPU is needed: tests/ops/cuda_emu.py compiles the very .cu files nvcc builds with g++ against the shim
in csrc/cuda/emu (how it works and what it cannot show: csrc/cuda/README.md). The launchers pick their
grids, blocks and shared memory as on an H100; the emulated driver checks every launch; each block's
threads run as fibers with real barrier and 32-lane warp semantics, shared memory and outputs poisoned.

Checked here: the emulation itself (barrier, shuffles, reported faults, rounding of the conversions);
every op against its reference on the awkward shapes and in the precisions and tolerances of the GPU
tests (tests/ops/test_cuda_ops.py, whose cases are reused); bit-identical results under other thread
and block orders and on repeated runs; and, with kernels broken on purpose (a barrier deleted, an index
or a launch configuration changed, in a copy of the source built at test time), that the harness fails.
Skips, with the reason, only where no C++ compiler (or no Linux) is available.
"""
from __future__ import annotations

import glob
import math
import os
import re

import cuda_emu
import pytest
import torch
from compare import assert_close_verbose
from test_closed_form_logits import SHAPES, make_case
from test_cuda_ops import CF_SHAPES, CONSUMER_SHAPES, CONV_KEYS, LOW, consumer_case, labels_for, reduce_case, to, tol

from carfast.ops.ablated_consumer import ablated_consumer_ref
from carfast.ops.closed_form_logits import closed_form_logits_ref
from carfast.ops.closed_form_score import closed_form_score_ref
from carfast.ops.score_reduce import score_reduce_ref

_WHY = cuda_emu.unavailable_reason()
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"CUDA emulation unavailable: {_WHY}")


@pytest.fixture(scope="module")
def lib() -> str:
    return cuda_emu.build()


@pytest.fixture
def emu(lib) -> cuda_emu.Emulator:
    return cuda_emu.Emulator(lib)


def conv_args(c: dict) -> tuple:
    return tuple(c[k] for k in CONV_KEYS) + (c["act"],)


def settings(c: dict) -> tuple:
    return tuple(c["stride"]), tuple(c["padding"]), tuple(c["dilation"])


# ---------------------------------------------------------------------------------------------
# The emulation itself (csrc/cuda/emu/selftest.cu)

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
    """A new .cu file or launcher must join the emulation (tests/ops/cuda_emu.py, csrc/cuda/emu/api.cpp)."""
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


# ---------------------------------------------------------------------------------------------
# ablated_consumer (the cases of test_cuda_ops.py)

def consumer_ref(c: dict, out_dtype=None) -> torch.Tensor:
    return ablated_consumer_ref(**c, out_dtype=out_dtype)


def run_consumer(emu, c: dict, out_dtype=None) -> torch.Tensor:
    return emu.ablated_consumer(*conv_args(c), c["filters"], c["images"], *settings(c), out_dtype)


def check_consumer(out: torch.Tensor, ref: torch.Tensor, what: str = "") -> None:
    assert out.shape == ref.shape and out.stride() == ref.stride() and out.dtype == ref.dtype
    assert_close_verbose(out, ref, atol=tol(ref), rtol=1e-5, what=what)


@pytest.mark.parametrize("name", list(CONSUMER_SHAPES))
def test_ablated_consumer_shapes(emu, name):
    c = consumer_case(**CONSUMER_SHAPES[name])
    out = run_consumer(emu, c)
    assert out.is_contiguous(memory_format=torch.channels_last)
    check_consumer(out, consumer_ref(c), name)


@pytest.mark.parametrize("act", [0, 1, 2])
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no_residual"])
@pytest.mark.parametrize("shape", ["base", "stride2", "dilation2"])
def test_ablated_consumer_epilogues(emu, act, residual, shape):
    c = consumer_case(act=act, residual=residual, **SHAPES[shape])
    check_consumer(run_consumer(emu, c), consumer_ref(c), f"act={act} {shape}")


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("shape", ["O17_C11", "stride2"])
def test_ablated_consumer_low_precision(emu, dtype, shape):
    """As test_cuda_ops: the error against float32 arithmetic at most about twice PyTorch's in that dtype."""
    c = to(consumer_case(**SHAPES[shape]), dtype=dtype, keys=CONV_KEYS)
    exact = consumer_ref(c, torch.float32).double()
    out = run_consumer(emu, c)
    assert out.dtype == dtype
    err = (out.double() - exact).abs().max().item()
    err_torch = (consumer_ref(c).double() - exact).abs().max().item()
    assert err <= 2 * err_torch + 1e-4 * exact.abs().max().item(), (err, err_torch)
    ref32 = consumer_ref(c, torch.float32)
    check_consumer(run_consumer(emu, c, torch.float32), ref32)
    # the kernel's own rounding of its float32 results is round-to-nearest-even, as torch's .to(dtype)
    assert torch.equal(out, run_consumer(emu, c, torch.float32).to(dtype))


def test_ablated_consumer_strides_mixed_dtypes_and_out_dtype(emu):
    c = consumer_case(N=3, K=4, O=6, H=6, W=6)
    ref = consumer_ref(c)
    s = dict(c)
    s["a"] = c["a"].transpose(2, 3).contiguous().transpose(2, 3)
    s["z"] = c["z"].contiguous(memory_format=torch.channels_last)
    s["residual"] = c["residual"].transpose(0, 1).contiguous().transpose(0, 1)
    s["weight"] = c["weight"].permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)
    s["filters"] = c["filters"].repeat_interleave(2)[::2]
    check_consumer(run_consumer(emu, s), ref, "strided")
    m = dict(c, a=c["a"].half(), weight=c["weight"].half())      # a in float16, z and residual float32
    check_consumer(run_consumer(emu, m), consumer_ref(m), "mixed")
    out64 = run_consumer(emu, c, torch.float64)
    assert out64.dtype == torch.float64 and out64.stride() == consumer_ref(c, torch.float64).stride()
    assert torch.equal(out64, run_consumer(emu, c).double())
    e = dict(c, filters=c["filters"][:0], images=c["images"][:0])
    assert run_consumer(emu, e).shape == (0,) + tuple(c["z"].shape[1:])


WIDE = dict(N=1, K=2, O=3, H=3, W=3000, C=2)   # a block needs over 48 KiB of shared memory: the opt-in path


def test_ablated_consumer_launch_configuration(emu):
    """The launcher's own grid and block reach the emulated device: one block of 256 threads per (pair,
    position tile, channel tile); a block needing over 48 KiB launches only with the opt-in attribute."""
    c = consumer_case(**CONSUMER_SHAPES["O40_W33"])
    check_consumer(run_consumer(emu, c), consumer_ref(c))
    (launch,) = emu.launches()
    P, (O, Ho, Wo) = len(c["filters"]), c["z"].shape[1:]
    OT = min(64, (O + 15) // 16 * 16)
    TQ = 256 // (OT // 16)
    assert launch["block"] == (256, 1, 1) and launch["grid"] == (P * -(-Ho * Wo // TQ) * -(-O // OT), 1, 1)
    w = consumer_case(**WIDE)
    check_consumer(run_consumer(emu, w), consumer_ref(w), "wide")
    assert all(x["shared_bytes"] > 48 * 1024 and x["error"] == 0 for x in emu.launches())


# ---------------------------------------------------------------------------------------------
# closed_form_logits and closed_form_score (one kernel)

def run_logits(emu, c: dict) -> torch.Tensor:
    return emu.closed_form_logits(*conv_args(c), c["tail"], c["logits"], c["filters"], *settings(c))


def run_score(emu, c: dict, labels: torch.Tensor):
    return emu.closed_form_score(*conv_args(c), c["tail"], c["logits"], c["filters"], labels, *settings(c))


def check_logits(out: torch.Tensor, c: dict, what: str = "") -> None:
    ref = closed_form_logits_ref(**c)
    assert_close_verbose(out, ref, atol=tol(ref, 2e-5), rtol=1e-5, what=what)
    for j, k in enumerate(c["filters"].tolist()):          # free zeros: exactly the intact logits
        zero = ~c["a"][:, k].flatten(1).ne(0).any(1)
        assert torch.equal(out[j][zero], c["logits"][zero])


def check_score(got, c: dict, labels: torch.Tensor, own_logits: torch.Tensor | None = None) -> None:
    """As test_cuda_ops: equal to the reference except on its near-ties; loss sums to 1e-5."""
    counts, loss_sums, correct = got
    J, (N, C) = len(c["filters"]), c["logits"].shape
    assert counts.shape == (J, C) and loss_sums.shape == (J, C) and correct.shape == (J, N)
    assert correct.view(torch.uint8).le(1).all(), "correct holds bytes other than 0 and 1 (left unwritten?)"
    if own_logits is not None:   # reduced from the kernel's own logits: exactly the same decisions
        slots = torch.arange(J).repeat_interleave(N)
        c2, l2, k2 = score_reduce_ref(own_logits.reshape(J * N, C), labels.repeat(J), slots, J)
        assert torch.equal(correct, k2.view(J, N)) and torch.equal(counts, c2)
        torch.testing.assert_close(loss_sums, l2, rtol=1e-12, atol=1e-12)
    ref_logits = closed_form_logits_ref(**c)
    rc, rl, rk = closed_form_score_ref(**c, labels=labels)
    top2 = ref_logits.topk(min(2, C), dim=2).values
    margin = (top2[..., 0] - top2[..., -1]) if C > 1 else torch.full((J, N), math.inf)
    near_tie = margin < 1e-5 * max(1.0, ref_logits.abs().max().item())
    assert torch.equal(correct[~near_tie], rk[~near_tie])
    if not near_tie.any():
        assert torch.equal(counts, rc)
    torch.testing.assert_close(loss_sums, rl, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(CF_SHAPES))
def test_closed_form_logits_shapes(emu, name):
    c = make_case(**CF_SHAPES[name])
    check_logits(run_logits(emu, c), c, name)


@pytest.mark.parametrize("act", [0, 1, 2])
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no_residual"])
@pytest.mark.parametrize("shape", ["base", "stride2"])
def test_closed_form_logits_epilogues(emu, act, residual, shape):
    c = make_case(act=act, residual=residual, **SHAPES[shape])
    check_logits(run_logits(emu, c), c, f"act={act} {shape}")


def test_closed_form_zero_channels_and_off_grid_pixels(emu):
    c = make_case(N=4, K=5, zeros=0.3)
    c["a"][:, 1] = 0
    c["a"][2, 3] = 0
    out = run_logits(emu, c)
    assert torch.equal(out[1], c["logits"]) and torch.equal(out[3, 2], c["logits"][2])
    assert not torch.equal(out[0], c["logits"])
    c = make_case(N=2, K=3, H=6, W=6, kernel=(1, 1), padding=(0, 0), stride=(2, 2))
    c["a"][:, 0] = 0
    c["a"][:, 0, 1::2, :] = 1.0
    assert torch.equal(run_logits(emu, c)[0], c["logits"])


@pytest.mark.parametrize("name", ["base", "K1", "O1", "O17_C11", "O70_C1", "odd_7x5", "stride2", "dilation2",
                                  "rect_mixed", "J1", "filters_repeat_unordered", "N1", "sparse", "dense", "C25",
                                  "C100_N40", "N70_sparse", "resnet_layer3", "big_channel"])
def test_closed_form_score_matches_reference(emu, name):
    c = make_case(**CF_SHAPES[name])
    labels = labels_for(c)
    got = run_score(emu, c, labels)
    assert [t.dtype for t in got] == [torch.int64, torch.float64, torch.bool]
    check_score(got, c, labels, own_logits=run_logits(emu, c))


PLAN_CASE = dict(N=40, K=3, O=70, H=9, W=9, C=3, zeros=0.3)


def check_plan_case(emu) -> dict:
    """Logits and scores of PLAN_CASE on ``emu``'s device; returns the plan the launcher chose."""
    c = make_case(**PLAN_CASE)
    labels = labels_for(c)
    check_logits(run_logits(emu, c), c)
    plan = emu.last_plan
    check_score(run_score(emu, c, labels), c, labels)
    tiles_launch, finish_launch = emu.launches()
    J, C = len(c["filters"]), c["logits"].shape[1]
    assert tiles_launch["grid"][0] == J * -(-c["a"].shape[0] // plan["tile_images"])
    assert finish_launch["grid"][0] == -(-J * C // 256) and tiles_launch["shared_bytes"] == plan["shared_bytes"]
    return plan


@pytest.mark.parametrize("sm_count, tile_images", [(1, 32), (2, 16), (3, 8), (132, 4)])
def test_closed_form_tile_sizes(lib, sm_count, tile_images):
    """The launcher's tile size follows the device's multiprocessors (full and short tiles here)."""
    plan = check_plan_case(cuda_emu.Emulator(lib, sm_count=sm_count))
    assert plan["tile_images"] == tile_images


def test_closed_form_shared_memory_layouts(lib):
    """Devices with less shared memory: the channels, or the weight slice, or both read from global memory."""
    full = check_plan_case(cuda_emu.Emulator(lib))
    assert full["a_in_shared"] and full["w_in_shared"]
    no_a = check_plan_case(cuda_emu.Emulator(lib, shared_optin=full["shared_bytes"] - 1))
    assert not no_a["a_in_shared"] and no_a["w_in_shared"]
    no_w = check_plan_case(cuda_emu.Emulator(lib, shared_optin=no_a["shared_bytes"] - 1))
    assert no_w["a_in_shared"] and not no_w["w_in_shared"]          # the channels fit where the weight did not
    neither = check_plan_case(cuda_emu.Emulator(lib, shared_optin=no_w["shared_bytes"] - 1))
    assert not neither["a_in_shared"] and not neither["w_in_shared"]


def test_closed_form_empty(emu):
    c = make_case()
    labels = labels_for(c)
    counts, loss_sums, correct = run_score(emu, make_case(N=0), torch.zeros(0, dtype=torch.int64))
    assert counts.shape == (4, 7) and not counts.any() and not loss_sums.any() and correct.shape == (4, 0)
    counts, _, correct = run_score(emu, make_case(filters=[]), labels)
    assert counts.shape == (0, 7) and correct.shape == (0, 3)


# ---------------------------------------------------------------------------------------------
# score_reduce

def check_reduce(got, logits, labels, slots, S) -> None:
    counts, loss_sums, correct = got
    assert correct.view(torch.uint8).le(1).all(), "correct holds bytes other than 0 and 1 (left unwritten?)"
    rc, rl, rk = score_reduce_ref(logits, labels, slots, S)
    assert torch.equal(correct, rk) and torch.equal(counts, rc)
    torch.testing.assert_close(loss_sums, rl, rtol=1e-12, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32] + LOW)
@pytest.mark.parametrize("P, C, S", [(1, 1, 1), (37, 10, 5), (700, 3, 2), (600, 7, 3), (50, 100, 4), (0, 5, 3),
                                     (20, 33, 40), (300, 1000, 2)])
def test_score_reduce_matches_reference(emu, dtype, P, C, S):
    logits, labels, slots = reduce_case(P, C, S, dtype)
    check_reduce(emu.score_reduce(logits, labels, slots, S), logits, labels, slots, S)
    assert emu.launches()[0]["grid"] == (S, 1, 1) and emu.launches()[0]["block"] == (256, 1, 1)


def test_score_reduce_strided(emu):
    logits = torch.randn(40, 12).t().contiguous().t()[:, ::2]
    labels, slots = torch.randint(0, 6, (40,)), torch.arange(40) // 7
    check_reduce(emu.score_reduce(logits, labels, slots, 7), logits, labels, slots, 7)


# ---------------------------------------------------------------------------------------------
# Determinism: bit for bit, run after run and under every schedule

def test_deterministic_under_every_schedule(lib):
    """A race-free kernel with fixed-order reductions gives the same bits whatever order its threads and
    blocks run in and whatever shared memory held before: the emulator's forward, reverse and shuffled
    orders, over poison bytes 0xff, 0x00 and 0x5a, must all agree, and a run must repeat."""
    c = make_case(**CF_SHAPES["N70_sparse"])
    labels = labels_for(c)
    logits, rl_labels, slots = reduce_case(3000, 10, 3, specials=False)
    k = consumer_case(**SHAPES["stride2"])
    results = []
    for order, seed, poison in (("forward", 0, 0xFF), ("forward", 0, 0xFF), ("reverse", 0, 0xFF),
                                ("shuffled", 1, 0x00), ("shuffled", 2, 0x5A)):
        emu = cuda_emu.Emulator(lib, order=order, seed=seed, poison=poison)
        results.append((run_score(emu, c, labels), run_logits(emu, c),
                        emu.score_reduce(logits, rl_labels, slots, 3), run_consumer(emu, k)))
    first = results[0]
    for other in results[1:]:
        for x, y in zip(first, other):
            xs, ys = (x, y) if isinstance(x, tuple) else ((x,), (y,))
            assert all(torch.equal(a, b) for a, b in zip(xs, ys))


# ---------------------------------------------------------------------------------------------
# The harness catches broken kernels: each mutation of a kernel's source (applied to a copy at build
# time) must fail the comparison under at least one schedule, where the unmodified kernel passes.
# A deleted barrier shows when a reader is scheduled before the writer ("forward" runs the lower warps
# ahead, "reverse" the higher ones) or a writer overwrites before a later-scheduled reader; both orders
# are tried, each in a forked child (a broken kernel may read out of bounds, crash or loop).

CUDA = cuda_emu.CUDA_DIR
ABLATED, CLOSED_FORM, REDUCE = (f"{CUDA}/ablated_consumer.cu", f"{CUDA}/closed_form_score.cu",
                                f"{CUDA}/score_reduce.cu")


def consumer_check(shape: dict):
    c = consumer_case(**shape)
    ref = consumer_ref(c)
    return (lambda emu: emu.prepare_ablated_consumer(*conv_args(c), c["filters"], c["images"], *settings(c)),
            lambda out: check_consumer(out, ref))


def logits_check(shape: dict):
    c = make_case(**shape)
    return (lambda emu: emu.prepare_closed_form(*conv_args(c), c["tail"], c["logits"], c["filters"], *settings(c)),
            lambda out: check_logits(out, c))


def score_check(shape: dict):
    c = make_case(**shape)
    labels = labels_for(c)
    return (lambda emu: emu.prepare_closed_form(*conv_args(c), c["tail"], c["logits"], c["filters"], *settings(c),
                                                labels=labels),
            lambda got: check_score(got, c, labels))


def reduce_check(P, C, S):
    logits, labels, slots = reduce_case(P, C, S)
    return (lambda emu: emu.prepare_score_reduce(logits, labels, slots, S),
            lambda got: check_reduce(got, logits, labels, slots, S))


# id: (file, text, its replacement, which occurrence (None: all), the checks that must catch it)
MUTANTS = {
    # ablated_consumer.cu
    "ablated_no_staging_barrier": (ABLATED, "__syncthreads();", "", 0, [consumer_check(SHAPES["base"])]),
    "ablated_no_transpose_barrier": (ABLATED, "__syncthreads();", "", 1, [consumer_check(SHAPES["base"])]),
    "ablated_transpose_index": (ABLATED, "rrow = r_s + qi * (OT + 1)", "rrow = r_s + qi * OT", None,
                                [consumer_check(SHAPES["base"])]),
    "ablated_half_the_threads": (ABLATED, "<<<grid, kThreads,", "<<<grid, kThreads / 2,", None,
                                 [consumer_check(SHAPES["base"])]),
    "ablated_no_shared_opt_in": (ABLATED, "if (smem > 48 * 1024) {", "if (smem > 64 * 1024) {", None,
                                 [consumer_check(WIDE)]),
    # closed_form_score.cu (the barriers in source order; the sixth, at the end of the group loop, is
    # redundant: the next group's staging barrier already separates its reads from the next writes)
    "closed_form_no_flag_barrier": (CLOSED_FORM, "__syncthreads();", "", 0, [logits_check(SHAPES["sparse"])]),
    "closed_form_no_list_barrier": (CLOSED_FORM, "__syncthreads();", "", 1, [logits_check(SHAPES["sparse"])]),
    "closed_form_no_staging_barrier": (CLOSED_FORM, "__syncthreads();", "", 2, [logits_check(SHAPES["dense"])]),
    "closed_form_no_reduction_barrier": (CLOSED_FORM, "__syncthreads();", "", 3, [logits_check(SHAPES["base"])]),
    "closed_form_no_sums_barrier": (CLOSED_FORM, "__syncthreads();", "", 4, [logits_check(SHAPES["base"])]),
    "closed_form_no_partials_barrier": (CLOSED_FORM, "__syncthreads();", "", 6,
                                        [score_check(CF_SHAPES["N70_sparse"])]),
    "closed_form_tap_index": (CLOSED_FORM, "wrow[ky * kw + kx]", "wrow[kx * kh + ky]", None,
                              [logits_check(SHAPES["base"])]),
    "closed_form_finish_grid": (CLOSED_FORM, "(args.J * args.C + kThreads - 1) / kThreads",
                                "args.J * args.C / kThreads", None, [score_check(SHAPES["base"])]),
    # common.cuh: the float warp_sum's butterfly starting at 8 lanes apart instead of 16
    "common_warp_sum_half": (f"{CUDA}/common.cuh", "k = kWarp / 2; k > 0; k >>= 1) v +=",
                             "k = kWarp / 4; k > 0; k >>= 1) v +=", 0, [logits_check(SHAPES["base"])]),
    # score_reduce.cu
    "reduce_no_range_barrier": (REDUCE, "__syncthreads();", "", 0, [reduce_check(37, 10, 5)]),
    "reduce_no_chunk_barrier": (REDUCE, "__syncthreads();", "", 1, [reduce_check(37, 10, 5)]),
    "reduce_no_overwrite_barrier": (REDUCE, "__syncthreads();", "", 2, [reduce_check(700, 3, 2)]),
    "reduce_chunk_off_by_one": (REDUCE, "min64(kChunk, end - base)", "min64(kChunk, end - base - 1)", None,
                                [reduce_check(37, 10, 5)]),
    "reduce_grid_one_short": (REDUCE, "<<<static_cast<unsigned>(x.S),", "<<<static_cast<unsigned>(x.S - 1),", None,
                              [reduce_check(37, 10, 5)]),
}


# (order, poison byte): a stale read must also differ from the poison's value to show, so both NaN / -1
# (0xff) and zeros are tried
SCHEDULES = (("forward", 0xFF), ("reverse", 0xFF), ("forward", 0x00), ("reverse", 0x00))


def outcome_fails(emu, prepare, check) -> str:
    """'' if the call runs and passes ``check``, else how it failed."""
    got = cuda_emu.run_isolated(emu, prepare(emu), timeout=30)
    if got.status != "ok":
        return f"{got.status}: {got.detail}"
    try:
        check(got.result)
    except AssertionError as e:
        return "wrong result: " + (str(e).strip().splitlines() or ["assertion failed"])[0][:200]
    return ""


@pytest.mark.parametrize("name", list(MUTANTS))
def test_broken_kernel_is_caught(lib, name):
    path, old, new, occurrence, checks = MUTANTS[name]
    broken = cuda_emu.build(cuda_emu.mutated(path, old, new, occurrence))
    for order, poison in SCHEDULES:
        intact = cuda_emu.Emulator(lib, order=order, poison=poison)
        emu = cuda_emu.Emulator(broken, order=order, poison=poison)
        for prepare, check in checks:
            check(intact.run(prepare(intact)))          # the unmodified kernel passes this very check
            if outcome_fails(emu, prepare, check):
                return
    pytest.fail(f"the harness did not notice {old!r} -> {new!r} in {path} under any of {SCHEDULES}")
