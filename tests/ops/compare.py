"""Comparison helper for the op tests: on failure, say how many elements differ and show the worst."""
from __future__ import annotations

import torch


def assert_close_verbose(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float,
                         show: int = 8, what: str = "") -> None:
    """Assert |actual - expected| <= atol + rtol * |expected| elementwise (NaN only where expected is NaN).

    On failure the message gives the number of differing elements out of the total, the largest
    absolute difference, and the first ``show`` differing elements (index, actual, expected, diff).
    """
    prefix = f"{what}: " if what else ""
    if actual.shape != expected.shape:
        raise AssertionError(f"{prefix}shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    if actual.dtype != expected.dtype:
        raise AssertionError(f"{prefix}dtype {actual.dtype} != expected {expected.dtype}")
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    diff = (a - e).abs()
    bad = ~(diff <= atol + rtol * e.abs())
    both_nan = a.isnan() & e.isnan()
    bad &= ~both_nan
    n_bad = int(bad.sum())
    if n_bad == 0:
        return
    idx = bad.nonzero()[:show]
    lines = [f"  {tuple(i.tolist())}: actual {a[tuple(i)].item():.9g}  expected {e[tuple(i)].item():.9g}  "
             f"diff {diff[tuple(i)].item():.3g}" for i in idx]
    worst = diff.masked_fill(both_nan, 0).nan_to_num(float("inf")).max().item()
    raise AssertionError(f"{prefix}{n_bad} of {a.numel()} elements differ (atol {atol:.3g}, rtol {rtol:.3g}, "
                         f"largest |diff| {worst:.3g}); first {len(lines)}:\n" + "\n".join(lines))
