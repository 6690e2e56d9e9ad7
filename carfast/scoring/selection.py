"""CAR's selection rules: which removal greedy CAR makes next, given the scores of every candidate.

The paper's rule ("accuracy") removes the filter whose removal keeps the most images correct. On a
finite selection set that count is noisy, and the greedy picks the luckiest of many noisy counts: the
accuracy it reaches on its own images over-states held-out accuracy (the winner's curse). "lcb" ranks by
a lower confidence bound of the count instead, from the images each removal flips either way; "loss"
by the summed cross-entropy. experiments/RESULTS.md compares them on held-out images.

Low precision (``precision="bf16"`` / ``"fp16"``) gives float32's correct counts (``precision.py``) but
loss sums with its own rounding. The counting rules ("accuracy", "lcb") therefore stay exact: their ties
(equal counts) are settled by loss sums re-computed in float32 for the tied candidates only
(``score_by_rule``). The "loss" rule ranks by the loss sums themselves, so it needs float32
(``check_rule_precision``).
"""
from __future__ import annotations

import math

import torch

from carfast.distributed import all_reduce_sum

__all__ = ["RULES", "DEFAULT_RULE", "LCB_Z", "check_rule", "check_rule_precision", "removal_key", "flip_counts",
           "rule_keys", "score_by_rule", "settled_keys"]

RULES = ("accuracy", "lcb", "loss")
DEFAULT_RULE = "loss"       # prune's, the command's and CARImportance's (chosen by measurement: experiments/RESULTS.md)
LCB_Z = 2.0                 # standard errors the "lcb" rule subtracts (1 and 2 measured: experiments/RESULTS.md)


def check_rule(rule: str, fn: str) -> str:
    """``rule`` if it is a selection rule, else ValueError naming the choices."""
    if rule not in RULES:
        raise ValueError(f"{fn}: rule must be one of {list(RULES)} ('accuracy': the paper's, most images still "
                         f"correct; 'lcb': a lower confidence bound of that; 'loss': smallest loss), got {rule!r}")
    return rule


def check_rule_precision(rule: str, precision, fn: str) -> None:
    """ValueError for the "loss" rule in low precision: its ranking would carry the rounding of bf16 / fp16
    loss sums, not float32's answer."""
    if rule == "loss" and precision not in (None, "fp32"):
        raise ValueError(f"{fn}: the 'loss' rule ranks by summed losses, which precision={precision!r} does not "
                         "compute exactly (only the correct counts are re-checked in float32); use "
                         "precision='fp32', or rule='accuracy' / 'lcb', whose ranking low precision keeps exact")


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


def score_by_rule(scorer, rule: str, process_group, filters=None, exact_first: int = 1):
    """Score ``filters`` (default: every remaining one) of a ``LayerScorer`` / ``GroupScorer``; returns
    (``LayerScores``, [key per scored filter]). With several processes the flips "lcb" needs are summed
    over ``process_group`` (the counts already are), so every process ranks alike.

    In low precision the first ``exact_first`` places of the ranking are float32's: the candidates whose
    count-based key ties with one of theirs are re-scored in float32 and their loss sums replaced."""
    check_rule_precision(rule, getattr(scorer, "precision", "fp32"), "score_by_rule")
    s = scorer.score(filters, per_image=rule == "lcb")
    flips = None
    if rule == "lcb" and process_group is not False and process_group is not None:
        flips = all_reduce_sum(list(flip_counts(s)), process_group, "score_by_rule")
    return s, settled_keys(scorer, s, rule, flips, exact_first)


def settled_keys(scorer, s, rule: str, flips=None, exact_first: int = 1) -> list[tuple]:
    """``rule_keys`` of ``s`` (``LayerScores`` of ``scorer``'s data); in low precision the ties that matter for
    the first ``exact_first`` places settled by float32 loss sums first (``s`` updated in place)."""
    keys = rule_keys(s, rule, flips)
    if s.precision != "fp32":
        _settle_ties(scorer, s, keys, exact_first)
        keys = rule_keys(s, rule, flips)
    return keys


def _settle_ties(scorer, s, keys: list[tuple], exact_first: int) -> None:
    """Replace, in place, the loss sums of ``s`` (low precision) of every candidate whose key but its last
    (loss) element ties with a candidate in the first ``exact_first`` places, by float32 ones."""
    filters = s.filters.tolist()
    order = sorted(range(len(keys)), key=lambda i: (keys[i], filters[i]))
    lead = {keys[i][:-1] for i in order[:exact_first]}
    tied = [i for i in range(len(keys)) if keys[i][:-1] in lead]
    if len(tied) == len({keys[i][:-1] for i in tied}):      # no ties where it matters
        return
    exact = scorer.score([filters[i] for i in tied], float32=True)
    if not torch.equal(exact.correct, s.correct[tied]):
        raise RuntimeError("score_by_rule: float32 counts differ from the low-precision run's re-checked ones; "
                           "please report this (the re-run margin was too small)")
    s.loss_sum[tied] = exact.loss_sum.to(s.loss_sum.dtype)
