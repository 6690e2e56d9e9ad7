"""Prune the same layers to the same sizes with several criteria and compare them on held-out images.

``compare_criteria(model, layers, data, held_out, keep, criteria)`` runs ``carfast.prune`` once per
criterion (greedy CAR and/or the baselines of ``carfast.criteria``), all on the same scoring images
``data``, and measures every pruned network's top-1 (or top-k) accuracy on ``held_out`` (images the filters were
not chosen on: accuracy on the scoring images flatters the criterion that chose on them, CAR most) with
``carfast.evaluate``. The first criterion sets the sizes: the others are pruned to exactly the number
of filters it kept in each layer (so a ``max_accuracy_drop`` that stops it early also fixes their size).

The outcome is a ``CriteriaComparison``; its ``to_dict()`` is plain data, the ``PruneResult.comparison``
record that ``PruneResult.save`` stores and the report draws (``carfast.report``)::

    {"held_out_images": 1000, "selection_images": 1000,
     "unpruned_held_out_accuracy": 0.922, "unpruned_selection_accuracy": 0.914,
     "filters": {layer: [before, after]},
     "rows": [{"criterion": "car", "held_out_accuracy": ..., "selection_accuracy": ...,
               "removed": {layer: [original filter indices, in removal order]}}, ...]}

"random" is ``carfast.criteria.random_scores`` with its fixed seed (0), so reruns agree.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from torch import nn

from carfast.criteria import CRITERIA
from carfast.errors import NearChanceWarning
from carfast.pruning.evaluate import evaluate
from carfast.pruning.prune import prune
from carfast.pruning.result import PruneResult

__all__ = ["compare_criteria", "CriteriaComparison", "criterion_label"]

_FN = "compare_criteria"
_FIRST_ONLY = ("checkpoint", "max_accuracy_drop")     # prune options that only the first criterion takes
_CAR_ONLY = ("rule", "search")                       # how CAR chooses: meaningless for the baselines
_LABELS = {"car": "CAR", "l1": "L1 norm", "random": "random (seed 0)", "mean_activation": "mean activation",
           "apoz": "APoZ", "taylor": "Taylor"}


def criterion_label(name: str) -> str:
    """How a criterion's name is shown in tables and figures ("car" -> "CAR")."""
    return _LABELS.get(name, name)


def _pct(v: float) -> str:
    return f"{100.0 * v:.2f}"


@dataclass
class CriteriaComparison:
    """Several criteria pruning the same layers to the same sizes, measured on the same images.

    rows:     one dict per criterion, in the order given: ``criterion``, ``held_out_accuracy`` and
              ``selection_accuracy`` (top-``topk`` fractions of the pruned network on the held-out and on the
              scoring images, both measured with ``carfast.evaluate``; after fine-tuning when ``finetune``
              was given), ``removed`` ({layer: original filter indices in removal order}).
    filters:  {layer: [filters before, filters after]}, the same for every row.
    topk:     the accuracy measured: top-1, or top-k (``topk`` of the runs).
    results:  {criterion: PruneResult} of this run (not part of ``to_dict``).
    """
    held_out_images: int
    selection_images: int
    unpruned_held_out_accuracy: float
    unpruned_selection_accuracy: float
    filters: dict
    rows: list
    topk: int = 1
    results: dict = field(default_factory=dict, repr=False, compare=False)

    def row(self, criterion: str) -> dict:
        """The row of ``criterion``; KeyError naming the criteria present otherwise."""
        for r in self.rows:
            if r["criterion"] == criterion:
                return r
        raise KeyError(f"CriteriaComparison: no row for {criterion!r}; rows: {[r['criterion'] for r in self.rows]}")

    def to_dict(self) -> dict:
        """Plain data (the ``PruneResult.comparison`` record)."""
        return {"held_out_images": int(self.held_out_images), "selection_images": int(self.selection_images),
                "unpruned_held_out_accuracy": float(self.unpruned_held_out_accuracy),
                "unpruned_selection_accuracy": float(self.unpruned_selection_accuracy),
                "filters": {k: [int(a), int(b)] for k, (a, b) in self.filters.items()},
                "rows": [{"criterion": str(r["criterion"]), "held_out_accuracy": float(r["held_out_accuracy"]),
                          "selection_accuracy": float(r["selection_accuracy"]),
                          "removed": {k: [int(f) for f in v] for k, v in r["removed"].items()}}
                         for r in self.rows], "topk": int(self.topk)}

    @classmethod
    def from_dict(cls, record: dict) -> "CriteriaComparison":
        """The comparison a ``to_dict`` record holds (e.g. ``PruneResult.comparison`` of a loaded file);
        ValueError naming the missing field for anything else."""
        need = ("held_out_images", "selection_images", "unpruned_held_out_accuracy", "unpruned_selection_accuracy",
                "filters", "rows")
        if not isinstance(record, dict) or any(k not in record for k in need):
            have = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(f"CriteriaComparison.from_dict: expected a dict with {', '.join(need)}; got {have}")
        for r in record["rows"]:
            if not isinstance(r, dict) or any(k not in r for k in ("criterion", "held_out_accuracy",
                                                                    "selection_accuracy", "removed")):
                raise ValueError("CriteriaComparison.from_dict: every row needs criterion, held_out_accuracy, "
                                 f"selection_accuracy and removed; got {r!r:.200}")
        return cls(record["held_out_images"], record["selection_images"], record["unpruned_held_out_accuracy"],
                   record["unpruned_selection_accuracy"], {k: tuple(v) for k, v in record["filters"].items()},
                   [dict(r) for r in record["rows"]], int(record.get("topk", 1)))

    def table_rows(self) -> list[tuple]:
        """(criterion label, held-out %, change vs unpruned in points, selection %) per row, unpruned first."""
        rows = [("unpruned", _pct(self.unpruned_held_out_accuracy), "", _pct(self.unpruned_selection_accuracy))]
        for r in self.rows:
            change = 100.0 * (r["held_out_accuracy"] - self.unpruned_held_out_accuracy)
            rows.append((criterion_label(r["criterion"]), _pct(r["held_out_accuracy"]), f"{change:+.2f} pts",
                         _pct(r["selection_accuracy"])))
        return rows

    def table(self) -> str:
        """A small text table: criterion, held-out top-k, change vs unpruned, top-k on the scoring images."""
        sizes = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in self.filters.items())
        header = ("criterion", f"held-out top-{self.topk} %", "vs unpruned", f"selection top-{self.topk} %")
        rows = [header, *self.table_rows()]
        w = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = [f"criteria compared at the same sizes: {sizes}",
                 f"held out: {self.held_out_images:,} images not used for choosing filters; selection: the "
                 f"{self.selection_images:,} images they were chosen on"]
        lines += [f"  {r[0]:<{w[0]}}  {r[1]:>{w[1]}}  {r[2]:>{w[2]}}  {r[3]:>{w[3]}}" for r in rows]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _check_criteria(criteria) -> list[str]:
    if isinstance(criteria, str):
        criteria = [c for c in criteria.split(",") if c]
    try:
        names = list(criteria)
    except TypeError:
        raise TypeError(f"{_FN}: criteria must be a list of names, e.g. ['car', 'l1', 'random'], got "
                        f"{type(criteria).__name__}") from None
    valid = ["car", *CRITERIA]
    for c in names:
        if not isinstance(c, str) or c not in valid:
            raise ValueError(f"{_FN}: unknown criterion {c!r}; valid names: {', '.join(valid)}")
    if not names or len(set(names)) != len(names):
        raise ValueError(f"{_FN}: criteria must name at least one criterion, each once; got {names}")
    return names


def compare_criteria(model: nn.Module, layers, data, held_out, keep, criteria=("car", "l1", "random"), *,
                     log=None, **prune_kwargs) -> CriteriaComparison:
    """Prune ``layers`` of ``model`` with each of ``criteria`` to the same sizes; measure each on ``held_out``.

    Args:
        model: the trained network (never changed).
        layers, keep: as ``carfast.prune`` (``keep`` is the share or number of filters KEPT). The first
            criterion prunes to ``keep``; the others to the filters it kept in each layer.
        data: the scoring (selection) images, ``(inputs [N, ...], labels [N])`` or any data ``prune`` takes.
        held_out: ``(inputs [M, ...], labels [M])`` (or batches) NOT used for scoring.
        criteria: names, in the order to run and show: "car" and/or keys of ``carfast.criteria.CRITERIA``
            ("random", "l1", "mean_activation", "apoz", "taylor"); a comma-separated string works too.
        log: optional ``callable(str)`` told, in one line each, which criterion starts and how it did.
        **prune_kwargs: passed to every ``carfast.prune`` call (``step``, ``schedule``, ``finetune``,
            ``progress``, ``device``, ``backend``, ...), except ``checkpoint`` and ``max_accuracy_drop``
            (the first criterion's run only) and ``rule`` and ``search`` (CAR's runs only).
    Returns:
        ``CriteriaComparison``: a row per criterion with held-out and selection accuracy and the removal
        order, and the ``PruneResult`` of each run in ``.results``.
    """
    names = _check_criteria(criteria)
    if held_out is None:
        raise ValueError(f"{_FN}: held_out is None; pass (inputs, labels) of images not used for scoring (e.g. "
                         "the rest of a test set): accuracy on the scoring images favours the criterion that "
                         "chose on them")
    for k in ("criterion", "keep", "layers"):
        if k in prune_kwargs:
            raise TypeError(f"{_FN}: {k}= is set by compare_criteria; pass criteria=[...] / keep / layers instead")
    topk = prune_kwargs.get("topk", 1)
    base_held = evaluate(model, held_out, topk=topk).accuracy
    results: dict[str, PruneResult] = {}
    rows, first_sizes, held_images = [], None, 0
    for i, name in enumerate(names):
        kwargs = {k: v for k, v in prune_kwargs.items()
                  if (i == 0 or k not in _FIRST_ONLY) and (name == "car" or k not in _CAR_ONLY)}
        if log is not None:
            log(f"pruning with {criterion_label(name)} ({i + 1} of {len(names)})")
        if first_sizes is None:
            res = prune(model, layers, data, keep=keep, criterion=name, **kwargs)
            first_sizes = {layer: len(k) for layer, k in res.kept.items()}
        else:
            with warnings.catch_warnings():      # the first run warned of near-chance accuracy: once per call
                warnings.filterwarnings("ignore", category=NearChanceWarning)
                res = prune(model, list(first_sizes), data, keep=dict(first_sizes), criterion=name, **kwargs)
        sizes = {layer: len(k) for layer, k in res.kept.items()}
        if sizes != first_sizes:                 # cannot happen without max_accuracy_drop, which only the first gets
            raise RuntimeError(f"{_FN}: {name} kept {sizes}, {names[0]} kept {first_sizes}; please report this")
        results[name] = res
        ev = evaluate(res.model, held_out, topk=topk)
        held_images = ev.num_images
        # measured, not taken from the run's history: the pruned network as it is, like the held-out figure
        selection = res.finetuned_accuracy if res.finetuned_accuracy is not None else \
            evaluate(res.model, data, topk=topk).accuracy
        rows.append({"criterion": name, "held_out_accuracy": ev.accuracy, "selection_accuracy": selection,
                     "removed": {layer: list(v) for layer, v in res.removed.items()}})
        if log is not None:
            log(f"{criterion_label(name)}: held-out top-{topk} {100 * ev.accuracy:.2f} % (unpruned "
                f"{100 * base_held:.2f} %, {ev.num_images:,} images), selection top-{topk} {100 * selection:.2f} %")
    first = results[names[0]]
    filters = {layer: (len(first.removed[layer]) + n, n) for layer, n in first_sizes.items()}
    return CriteriaComparison(held_images, first.base["num_images"], base_held, first.base["accuracy"], filters,
                              rows, topk, results)
