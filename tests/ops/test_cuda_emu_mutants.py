"""The harness catches broken kernels: each CUDA kernel broken on purpose must fail a check the intact one passes.

Each mutation (a barrier deleted, an index or a loop bound changed, a launch's block, grid or shared-memory
opt-in changed, a warp reduction shortened in common.cuh) is applied to a copy of the source at build time
(tests/ops/cuda_emu/mutants.py), never to the file, and the broken build runs in a forked child, since it
may read out of bounds, crash or loop. How the emulation works and what it cannot show: csrc/cuda/README.md.
Skips, with the reason, only where no C++ compiler (or no Linux) is available.
"""
from __future__ import annotations

import cuda_emu
import pytest
from cuda_emu_checks import (
    WIDE,
    check_consumer,
    check_logits,
    check_reduce,
    check_score,
    consumer_ref,
    conv_args,
    settings,
)
from test_closed_form_logits import SHAPES, make_case
from test_cuda_ops import CF_SHAPES, consumer_case, labels_for, reduce_case

_WHY = cuda_emu.unavailable_reason()
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"CUDA emulation unavailable: {_WHY}")


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
