"""Scoring reduction: from ablated logits and labels, per-(filter, class) correct counts and loss sums.

``pair_results`` is the per-pair primitive (top-k correctness and cross-entropy of each row);
``score_reduce_ref`` is the op's reference: pairs grouped by a *slot* (the scored filter's position)
reduce to integer counts and float64 loss sums per (slot, class of the label), which add up exactly
across batches and processes (``scoring/scorer.py`` accumulates them).

Backends: "torch" and "cpu" (this reference), "triton" (``ops/triton/score_reduce.py``) and "cuda"
(``csrc/cuda/score_reduce.cu``, registered as ``torch.ops.carfast.score_reduce``). The compiled
kernels give the same counts and correctness bits, and loss sums within float64 rounding; they are
deterministic (no float atomics: each slot's pairs are summed in a fixed order). They count top-1;
top-k with k > 1 runs this reference on any backend (same results, without the fused kernel's speed).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from carfast import extensions
from carfast.ops import dispatch

__all__ = ["label_rank", "pair_loss", "pair_results", "score_reduce_ref", "score_reduce"]


def label_rank(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits [P, C], labels [P] int64 -> [P] int64: the label's 0-based rank among its row's logits, ties
    ranked by class index (lower first, as ``argmax``): classes above it plus equal classes before it."""
    own = logits.gather(1, labels[:, None])
    before = torch.arange(logits.shape[1], device=logits.device)[None, :] < labels[:, None]
    return ((logits > own) | ((logits == own) & before)).sum(1)


def pair_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits [P, C] float, labels [P] int64 -> [P] float64: each row's cross-entropy, computed in float64."""
    return F.cross_entropy(logits.double(), labels, reduction="none")


def pair_results(logits: torch.Tensor, labels: torch.Tensor, topk: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [P, C] float, labels [P] int64 -> (correct [P] bool, loss [P] float64).

    ``correct``: the label is among the ``topk`` largest logits (top-1: argmax == label; ties resolve to
    the lowest class index, as ``argmax`` does); ``loss`` is the cross-entropy, computed in float64.
    """
    correct = logits.argmax(1) == labels if topk == 1 else label_rank(logits, labels) < topk
    return correct, pair_loss(logits, labels)


def score_reduce_ref(logits: torch.Tensor, labels: torch.Tensor, slots: torch.Tensor,
                     num_slots: int, topk: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-(slot, class) counts and loss sums of a batch of pairs; plain PyTorch.

    Args:
        logits:    [P, C] float32 / float16 / bfloat16, one row of (ablated) logits per pair.
        labels:    [P] int64 in [0, C), the pair's image label.
        slots:     [P] int64 in [0, S), non-decreasing: which scored filter the pair belongs to.
        num_slots: S.
        topk:      what counts as correct: the label among the ``topk`` largest logits (default 1).
    Returns:
        counts    [S, C] int64:   pairs of slot s with label c counted correct (top-1: whose top-1 is c);
        loss_sums [S, C] float64: summed cross-entropy (computed in float64) of slot s's pairs of label c;
        correct   [P] bool:       correct per pair (ties go to the lowest class index).
    """
    C = logits.shape[1]
    correct, loss = pair_results(logits, labels, topk)
    counts = torch.zeros(num_slots, C, dtype=torch.int64, device=logits.device)
    loss_sums = torch.zeros(num_slots, C, dtype=torch.float64, device=logits.device)
    counts.index_put_((slots, labels), correct.long(), accumulate=True)
    loss_sums.index_put_((slots, labels), loss, accumulate=True)
    return counts, loss_sums, correct


def check_score_reduce_args(logits, labels, slots, num_slots) -> None:
    """ValueError naming the problem and the fix, for the arguments every backend shares."""
    fn = "score_reduce"
    if logits.dim() != 2:
        raise ValueError(f"{fn}: logits must be [P, C], got shape {tuple(logits.shape)}")
    P = logits.shape[0]
    for name, t in (("labels", labels), ("slots", slots)):
        if t.shape != (P,) or t.dtype != torch.int64:
            raise ValueError(f"{fn}: {name} must be int64 of shape [{P}], got {t.dtype} {tuple(t.shape)}")
    if P and int(slots[-1]) >= num_slots:
        raise ValueError(f"{fn}: slots reach {int(slots[-1])} but num_slots={num_slots}; pass a larger num_slots")
    if P > 1 and bool((slots[1:] < slots[:-1]).any()):
        raise ValueError(f"{fn}: slots must be non-decreasing (pairs grouped by filter); sort the pairs by slot")


def score_reduce(logits, labels, slots, num_slots: int, backend: str = "torch", topk: int = 1):
    """``score_reduce_ref`` on the chosen backend (``dispatch``: "torch", "triton" or "cuda"; "cpu" has no kernel
    of its own and runs the reference); same contract.

    The triton and cuda kernels count top-1 and check their arguments themselves (one device sync each),
    so the checks are not repeated here for them; ``topk`` > 1 runs the reference on any backend."""
    return dispatch.implementation("score_reduce", backend, topk)(logits, labels, slots, num_slots, topk)


def _checked_ref(logits, labels, slots, num_slots, topk=1):
    check_score_reduce_args(logits, labels, slots, num_slots)
    return score_reduce_ref(logits, labels, slots, num_slots, topk)


def _triton(logits, labels, slots, num_slots, topk=1):
    from carfast.ops.triton import score_reduce as tri
    return tri.score_reduce(logits, labels, slots, num_slots)


def _cuda(logits, labels, slots, num_slots, topk=1):
    return tuple(torch.ops.carfast.score_reduce(logits, labels, slots, int(num_slots)))


dispatch.register("score_reduce", "torch", _checked_ref)
dispatch.register("score_reduce", "triton", _triton)
dispatch.register("score_reduce", "cuda", _cuda)


if extensions.has_op("score_reduce"):
    @torch.library.register_fake("carfast::score_reduce")
    def _score_reduce_fake(logits, labels, slots, num_slots):
        C = logits.shape[1]
        return (logits.new_empty((num_slots, C), dtype=torch.int64),
                logits.new_empty((num_slots, C), dtype=torch.float64),
                logits.new_empty((logits.shape[0],), dtype=torch.bool))

    # the reference serves as the CPU kernel of the registered op (so opcheck covers schema and fake here)
    torch.library.impl("carfast::score_reduce", "CPU")(score_reduce_ref)
