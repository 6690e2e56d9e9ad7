"""Low-precision suffix with an exact float32 fallback (docs/design.md 3.6).

With ``precision="bf16"`` or ``"fp16"`` the suffix (the network after the consumer) runs in that dtype
and every (filter, image) pair whose low-precision top-1 margin (largest logit minus the second) is at
most a threshold is re-run in float32. Why that gives float32's top-1: let e = max_c |l_c - L_c| be a
pair's largest logit error (l low precision, L float32). If float32's top-1 is class a and the
low-precision top-1 is b != a, then l_b >= l_a, so the low-precision margin l_b - max_{c != b} l_c <=
l_b - l_a <= (L_b + e) - (L_a - e) <= 2e. Hence a pair with margin > 2e has the same top-1 in both.
Top-k (``topk_margin``): let v_0 >= v_1 >= ... be the sorted low-precision logits and the margin
v_{k-1} - v_k. If the label y is in float32's top-k but not in low precision's, then k or more classes
are at least l_y in low precision, and every class with l_c > l_y + 2e has L_c > L_y, so fewer than k
do: v_{k-1} <= l_y + 2e while v_k >= l_y. If y is in low precision's top-k but not float32's, k or more
classes c have L_c >= L_y, so l_c >= l_y - 2e, and with y itself v_k >= l_y - 2e while v_{k-1} <= l_y.
Either way the margin is at most 2e, so the same threshold decides which pairs to re-run.

The threshold is 2 * SAFETY * E, where E is the largest e measured on CALIBRATION_PAIRS (filter,
image) pairs drawn at random (seeded) from the first chunk, each evaluated both ways. The rounding
error of a pair comes from the same network on inputs that differ from the intact ones in one
channel, so it is drawn from the same distribution as the calibration sample's; SAFETY = 4 puts the
threshold at four times the largest of 1024 draws (for a roughly Gaussian error, about 13 standard
deviations where the sample maximum is about 3.3). The tests and the benchmarks check that the
counts equal the float32 ones; the number of re-run pairs is reported in ``LayerScores``.
"""
from __future__ import annotations

import torch

__all__ = ["PRECISIONS", "SAFETY", "CALIBRATION_PAIRS", "check_precision", "top1_margin", "topk_margin",
           "margin_threshold"]

#: the accepted ``precision`` values and the suffix dtype of each
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SAFETY = 4.0
CALIBRATION_PAIRS = 1024


def check_precision(precision, fn: str) -> torch.dtype:
    """The dtype of ``precision``; ValueError naming the choices otherwise."""
    if precision not in PRECISIONS:
        raise ValueError(f"{fn}: precision {precision!r} unknown; choose one of {', '.join(PRECISIONS)}")
    return PRECISIONS[precision]


def top1_margin(logits: torch.Tensor) -> torch.Tensor:
    """[P, C] logits -> [P] float32, the largest logit minus the second largest (inf when C == 1)."""
    if logits.shape[1] < 2:
        return torch.full((logits.shape[0],), float("inf"), device=logits.device)
    top = logits.float().topk(2, dim=1).values
    return top[:, 0] - top[:, 1]


def topk_margin(logits: torch.Tensor, k: int = 1) -> torch.Tensor:
    """[P, C] logits -> [P] float32, the k-th largest logit minus the (k+1)-th (top-1: ``top1_margin``;
    inf when C <= k: every class is in the top k)."""
    if k == 1:
        return top1_margin(logits)
    if logits.shape[1] <= k:
        return torch.full((logits.shape[0],), float("inf"), device=logits.device)
    top = logits.float().topk(k + 1, dim=1).values
    return top[:, k - 1] - top[:, k]


def margin_threshold(low: torch.Tensor, exact: torch.Tensor) -> float:
    """The re-run threshold from calibration pairs: low [P, C] low-precision logits, exact [P, C] float32
    logits of the same pairs. At least 1e-6 of the logit scale, so exact ties are always re-run."""
    err = (low.float() - exact).abs().max()
    floor = 1e-6 * float(exact.abs().max()) + torch.finfo(torch.float32).tiny
    return max(2.0 * SAFETY * float(err), floor)
