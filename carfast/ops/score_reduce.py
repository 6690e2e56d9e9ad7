"""Scoring reduction: from logits and labels, per-image correctness and cross-entropy.

Shards of images reduce to integer counts per (filter, class) and float64 loss sums, which add up
exactly across batches and processes (``engine.py`` accumulates them).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["score_reduce_ref"]


def score_reduce_ref(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [P, C] float, labels [P] int64 -> (correct [P] bool, loss [P] float64).

    ``correct`` is top-1 == label (ties resolve to the lowest class index, as ``argmax`` does);
    ``loss`` is the cross-entropy, computed in float64.
    """
    correct = logits.argmax(1) == labels
    loss = F.cross_entropy(logits.double(), labels, reduction="none")
    return correct, loss
