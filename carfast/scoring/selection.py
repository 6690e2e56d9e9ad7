"""CAR's selection rules: which removal greedy CAR makes next, given the scores of every candidate.

The paper's rule ("accuracy") removes the filter whose removal keeps the most images correct. On a
finite selection set that count is noisy, and the greedy picks the luckiest of many noisy counts: the
accuracy it reaches on its own images over-states held-out accuracy (the winner's curse). "lcb" ranks by
a lower confidence bound of the count instead, from the images each removal flips either way; "loss"
by the summed cross-entropy. experiments/RESULTS.md compares them on held-out images.
"""
from __future__ import annotations

import math

import torch

from carfast.distributed import all_reduce_sum

__all__ = ["RULES", "DEFAULT_RULE", "LCB_Z", "check_rule", "removal_key", "flip_counts", "rule_keys", "score_by_rule"]

RULES = ("accuracy", "lcb", "loss")
DEFAULT_RULE = "loss"       # prune's, the command's and CARImportance's (chosen by measurement: experiments/RESULTS.md)
LCB_Z = 2.0                 # standard errors the "lcb" rule subtracts (1 and 2 measured: experiments/RESULTS.md)


def check_rule(rule: str, fn: str) -> str:
    """``rule`` if it is a selection rule, else ValueError naming the choices."""
    if rule not in RULES:
        raise ValueError(f"{fn}: rule must be one of {list(RULES)} ('accuracy': the paper's, most images still "
                         f"correct; 'lcb': a lower confidence bound of that; 'loss': smallest loss), got {rule!r}")
    return rule


def removal_key(correct: int, loss_sum: float, *ties) -> tuple:
    """The paper's order: most images still correct without the filter first, then the smallest summed
    loss, then ``ties`` (e.g. the target's position, the filter's index)."""
    return (-correct, loss_sum, *ties)


def flip_counts(scores) -> tuple[torch.Tensor, torch.Tensor]:
    """([F] int64 images each removal turns right, [F] int64 images it turns wrong) of ``LayerScores``
    scored with ``per_image=True``."""
    if scores.image_correct is None:
        raise ValueError("the 'lcb' rule needs per-image results: score with per_image=True")
    now, base = scores.image_correct, scores.base_image_correct
    return (now & ~base).sum(1), (~now & base).sum(1)


def rule_keys(scores, rule: str = "accuracy", flips=None) -> list[tuple]:
    """Per scored filter of ``LayerScores`` (in ``scores.filters`` order), the key greedy CAR removes the
    smallest of.

    "accuracy" (the paper's): ``removal_key`` (most images correct, then smallest loss).
    "lcb": the largest lower confidence bound of the change in correct images, ``gained - lost -
    LCB_Z * sqrt(gained + lost)``, where gained / lost count the images the removal turns right / wrong
    (each flip is a paired +-1, so ``sqrt(gained + lost)`` is the count's standard error); ties: most
    images correct, then loss. Needs per-image results or ``flips`` (``flip_counts``, e.g. summed over
    processes).
    "loss": smallest summed cross-entropy, then most images correct.
    """
    check_rule(rule, "rule_keys")
    correct, loss = scores.correct.sum(1).tolist(), scores.loss_sum.tolist()
    if rule == "accuracy":
        return [removal_key(c, lo) for c, lo in zip(correct, loss)]
    if rule == "loss":
        return [(lo, -c) for c, lo in zip(correct, loss)]
    gained, lost = (t.tolist() for t in (flips if flips is not None else flip_counts(scores)))
    return [(-(g - lo - LCB_Z * math.sqrt(g + lo)), -c, ls) for g, lo, c, ls in zip(gained, lost, correct, loss)]


def score_by_rule(scorer, rule: str, process_group, filters=None):
    """Score ``filters`` (default: every remaining one) of a ``LayerScorer`` / ``GroupScorer``; returns
    (``LayerScores``, [key per scored filter]). With several processes the flips "lcb" needs are summed
    over ``process_group`` (the counts already are), so every process ranks alike."""
    s = scorer.score(filters, per_image=rule == "lcb")
    flips = None
    if rule == "lcb" and process_group is not False and process_group is not None:
        flips = all_reduce_sum(list(flip_counts(s)), process_group, "score_by_rule")
    return s, rule_keys(s, rule, flips)
