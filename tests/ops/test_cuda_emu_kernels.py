"""The CUDA kernels (csrc/cuda/*.cu) run on the CPU, on every test run, against the plain-PyTorch references.

No GPU is needed: tests/ops/cuda_emu/ compiles the very .cu files nvcc builds with g++ against the shim
in csrc/cuda/emu (how it works and what it cannot show: csrc/cuda/README.md). The launchers pick their
grids, blocks and shared memory as on an H100; the emulated driver checks every launch; each block's
threads run as fibers with real barrier and 32-lane warp semantics, shared memory and outputs poisoned.

Checked here: every op against its reference on the awkward shapes and in the precisions and tolerances
of the GPU tests (tests/ops/test_cuda_ops.py, whose cases are reused), with the launches' grids, blocks
and shared memory and closed_form's plans for other devices; and bit-identical results under other
thread and block orders and on repeated runs. The emulation's own checks are test_cuda_emu_runtime.py,
the broken kernels the harness must catch test_cuda_emu_mutants.py. Skips, with the reason, only where
no C++ compiler (or no Linux) is available.
"""
from __future__ import annotations

import cuda_emu
import pytest
import torch
from cuda_emu_checks import (
    WIDE,
    check_consumer,
    check_logits,
    check_reduce,
    check_score,
    consumer_ref,
    run_consumer,
    run_logits,
    run_score,
)
from test_closed_form_logits import SHAPES, make_case
from test_cuda_ops import CF_SHAPES, CONSUMER_SHAPES, CONV_KEYS, LOW, consumer_case, labels_for, reduce_case, to

_WHY = cuda_emu.unavailable_reason()
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"CUDA emulation unavailable: {_WHY}")



# ---------------------------------------------------------------------------------------------
# ablated_consumer (the cases of test_cuda_ops.py)

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
