"""Triton kernel of ``score_reduce``: per-(slot, class) correct counts and float64 loss sums of pairs grouped by slot.

Contract and oracle: ``carfast.ops.score_reduce.score_reduce_ref``. Registered as
``torch.ops.carfast_triton.score_reduce``.

Kernel: one program per slot s. Its pairs are the segment [bounds[s], bounds[s + 1]) of the rows (the
slots are sorted; ``bounds`` comes from ``torch.searchsorted``), read in blocks of BLOCK_P rows in order.
Each row of logits ([BLOCK_C] = C rounded up to a power of two, padding masked to -inf) gives the top-1
(ties to the lowest class index, as ``argmax``), the correct bit, and the cross-entropy in float64
(max + log(sum(exp(x - max))) - x[label], exp and log in float64); the program adds them into its
[BLOCK_C] per-class counter (int64) and loss sum (float64) in a fixed order and writes its row of
``counts`` / ``loss_sums`` (zeros for an empty slot). No atomics: results are bit-identical run to run.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from carfast.ops.score_reduce import check_score_reduce_args
from carfast.ops.triton import FLOAT_DTYPES, INTERPRET, check_device, next_pow2, on_device

__all__ = ["score_reduce"]

_MAX_BLOCK_C = 1 << 14
_TILE = 1 << 14 if INTERPRET else 512      # elements of a program's [BLOCK_P, BLOCK_C] tile


@triton.jit
def _score_reduce_kernel(logits_ptr, labels_ptr, bounds_ptr, counts_ptr, loss_ptr, correct_ptr,
                         C, s_p, s_c,
                         BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    s = tl.program_id(0).to(tl.int64)
    start = tl.load(bounds_ptr + s)
    end = tl.load(bounds_ptr + s + 1)
    cls = tl.arange(0, BLOCK_C)
    c_ok = cls < C
    count = tl.zeros([BLOCK_C], dtype=tl.int64)
    loss_sum = tl.zeros([BLOCK_C], dtype=tl.float64)
    for p0 in range(start, end, BLOCK_P):
        rows = p0 + tl.arange(0, BLOCK_P)                              # int64
        r_ok = rows < end
        x = tl.load(logits_ptr + rows[:, None] * s_p + cls[None, :] * s_c,
                    mask=r_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
        x = tl.where(c_ok[None, :], x, float("-inf"))
        label = tl.load(labels_ptr + rows, mask=r_ok, other=0)
        # top-1, ties to the lowest class index
        x_max = tl.max(x, axis=1)
        top = tl.min(tl.where(x == x_max[:, None], cls[None, :], BLOCK_C), axis=1)
        correct = (top == label) & r_ok
        tl.store(correct_ptr + rows, correct, mask=r_ok)
        # cross-entropy in float64
        x64 = x.to(tl.float64)
        m64 = x_max.to(tl.float64)
        e = tl.where(c_ok[None, :], tl.exp(x64 - m64[:, None]), 0.0)
        hot = (cls[None, :] == label[:, None]) & r_ok[:, None]       # [BLOCK_P, BLOCK_C] one-hot label
        loss = m64 + tl.log(tl.sum(e, axis=1)) - tl.sum(tl.where(hot, x64, 0.0), axis=1)
        count += tl.sum((hot & correct[:, None]).to(tl.int64), axis=0)
        loss_sum += tl.sum(tl.where(hot, loss[:, None], 0.0), axis=0)
    tl.store(counts_ptr + s * C + cls, count, mask=c_ok)
    tl.store(loss_ptr + s * C + cls, loss_sum, mask=c_ok)


# the schema of csrc/ops.cpp's carfast::score_reduce
@torch.library.custom_op(
    "carfast_triton::score_reduce", mutates_args=(),
    schema="(Tensor logits, Tensor labels, Tensor slots, int num_slots) -> (Tensor, Tensor, Tensor)")
def _score_reduce_op(logits: torch.Tensor, labels: torch.Tensor, slots: torch.Tensor,
                     num_slots: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    fn = "score_reduce"
    if not isinstance(logits, torch.Tensor) or logits.dtype not in FLOAT_DTYPES:
        got = logits.dtype if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"{fn}: logits must be float32, float16 or bfloat16, got {got}; convert it (logits.float())")
    check_score_reduce_args(logits, labels, slots, num_slots)       # shapes, int64, slots sorted and < num_slots
    check_device(fn, logits=logits, labels=labels, slots=slots)
    if num_slots < 0:
        raise ValueError(f"{fn}: num_slots must be >= 0, got {num_slots}")
    P, C = logits.shape
    if P and C == 0:
        raise ValueError(f"{fn}: logits has no classes (shape {tuple(logits.shape)}); pass at least one class")
    if next_pow2(C) > _MAX_BLOCK_C:
        raise ValueError(f"{fn}: the triton kernel holds a row of logits in registers, at most {_MAX_BLOCK_C} "
                         f"classes; got {C}: use backend='torch' or 'cuda'")
    if P:
        lo, hi, first = torch.stack([labels.min(), labels.max(), slots[0]]).tolist()
        if lo < 0 or hi >= C:
            raise ValueError(f"{fn}: labels must lie in [0, {C}), got values in [{lo}, {hi}]")
        if first < 0:
            raise ValueError(f"{fn}: slots must lie in [0, num_slots), got {first}")
    dev = logits.device
    counts = torch.empty((num_slots, C), dtype=torch.int64, device=dev)
    loss_sums = torch.empty((num_slots, C), dtype=torch.float64, device=dev)
    correct = torch.empty((P,), dtype=torch.bool, device=dev)
    if num_slots == 0 or C == 0:
        return counts, loss_sums, correct
    # pairs of slot s: rows bounds[s] .. bounds[s + 1] - 1
    bounds = torch.searchsorted(slots, torch.arange(num_slots + 1, dtype=torch.int64, device=dev))
    BLOCK_C = next_pow2(C)
    BLOCK_P = max(1, min(next_pow2(P), _TILE // BLOCK_C, 128))
    labels = labels.contiguous()                                   # read as labels_ptr + row
    with on_device(logits):
        _score_reduce_kernel[(num_slots,)](logits, labels, bounds, counts, loss_sums, correct, C, *logits.stride(),
                                          BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C, num_warps=4)
    return counts, loss_sums, correct


@_score_reduce_op.register_fake
def _(logits, labels, slots, num_slots):
    C = logits.shape[1]
    return (logits.new_empty((num_slots, C), dtype=torch.int64),
            logits.new_empty((num_slots, C), dtype=torch.float64),
            logits.new_empty((logits.shape[0],), dtype=torch.bool))


def score_reduce(logits: torch.Tensor, labels: torch.Tensor, slots: torch.Tensor,
                 num_slots: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``score_reduce_ref`` on the Triton kernel; same contract.

    Args:
        logits [P, C] float32/float16/bfloat16 (any strides), labels [P] int64 in [0, C),
        slots [P] int64 non-decreasing in [0, num_slots), num_slots S.
    Returns:
        counts [S, C] int64, loss_sums [S, C] float64, correct [P] bool.
    """
    return tuple(torch.ops.carfast_triton.score_reduce(logits, labels, slots, int(num_slots)))
