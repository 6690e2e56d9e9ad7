"""Class-wise CAR: which classes depend on each filter, and which filters each class depends on.

``ClassImportance.from_scores(scores, class_names)`` reads ``LayerScores.class_car`` ([F, C]
float64: for filter f and class c, the intact model's accuracy on class c minus its accuracy on c
without filter f; positive = class c loses accuracy without the filter) and offers:

- ``per_filter(top)``: each filter's most and least important classes (what the filter does);
- ``per_class(top)``: each class's most important filters;
- ``selectivity()``: one number per filter, how concentrated its damage is on few classes;
- ``matrix``, ``car``, ``filters``, ``class_names``, ``to_dict()``, ``table()``.

A class with no images has a NaN column in ``class_car``; it is left out of every ranking and of the
selectivity, and written as None by ``to_dict``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from carfast.scoring.scores import LayerScores

__all__ = ["ClassImportance"]


def _rank(values: list[float], ids: list, top: int, largest: bool) -> list[tuple]:
    """``top`` (id, value) pairs with the largest (or smallest) values, NaN skipped; ties by position."""
    pairs = [(i, v) for i, v in enumerate(values) if not math.isnan(v)]
    pairs.sort(key=lambda p: (-p[1] if largest else p[1], p[0]))
    return [(ids[i], v) for i, v in pairs[:top]]


def _check_top(top, fn: str) -> int:
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"ClassImportance.{fn}: top must be a positive int, got {top!r}")
    return top


@dataclass
class ClassImportance:
    """Class-wise CAR of one layer's filters.

    Fields:
        layer:        name of the scored layer.
        filters:      [F] int64, filter indices (rows of ``matrix``).
        class_names:  C names (default "0" .. "C-1").
        matrix:       [F, C] float64, ``LayerScores.class_car``: accuracy of class c lost without
                      filter f (fraction; negative when the class gains; NaN for a class with no images).
        car:          [F] float64, ``LayerScores.car``: overall accuracy lost without the filter.
    """

    layer: str
    filters: torch.Tensor
    class_names: list[str]
    matrix: torch.Tensor
    car: torch.Tensor

    @classmethod
    def from_scores(cls, scores: LayerScores, class_names: list[str] | None = None) -> "ClassImportance":
        """From ``LayerScores`` (``score_layer``'s result); ``class_names``: C names, e.g.
        ``carfast.data.cifar10_classes()``."""
        if not isinstance(scores, LayerScores):
            raise TypeError(f"ClassImportance.from_scores: expected LayerScores (score_layer's result), got "
                            f"{type(scores).__name__}")
        num = scores.num_classes
        if class_names is None:
            class_names = [str(c) for c in range(num)]
        class_names = [str(c) for c in class_names]
        if len(class_names) != num:
            raise ValueError(f"ClassImportance.from_scores: {len(class_names)} class names for {num} classes; "
                             "pass one name per class, in label order")
        if len(set(class_names)) != num:
            raise ValueError("ClassImportance.from_scores: class names repeat; pass distinct names")
        return cls(scores.layer, scores.filters.clone(), class_names, scores.class_car.clone(), scores.car.clone())

    # ---- views -----------------------------------------------------------------------------------------
    def per_filter(self, top: int = 3) -> dict[int, dict]:
        """For each filter (in ``filters`` order): ``{filter: {"most": [(class, value), ...], "least": [...]}}``,
        its ``top`` classes of largest class CAR (most important, largest first) and of smallest (least
        important, smallest first); keyed by filter as ``per_class`` is keyed by class. Ties go to the lower
        class index. With ``2 * top`` above the number of classes the two lists share classes."""
        top = _check_top(top, "per_filter")
        return {f: {"most": _rank(row, self.class_names, top, True), "least": _rank(row, self.class_names, top, False)}
                for f, row in zip(self.filters.tolist(), self.matrix.tolist())}

    def per_class(self, top: int = 5) -> dict[str, list[tuple[int, float]]]:
        """For each class name: the ``top`` filters of largest class CAR for that class, as (filter,
        value), largest first, ties to the lower row; an empty list for a class with no images."""
        top = _check_top(top, "per_class")
        filters = self.filters.tolist()
        return {name: _rank(col, filters, top, True) for name, col in zip(self.class_names, self.matrix.T.tolist())}

    def selectivity(self) -> torch.Tensor:
        """[F] float64 in [0, 1]: how much a filter's damage concentrates on few classes.

        With p = max(class CAR, 0) over the C' classes that have images (the accuracy each class loses;
        gains count as none) and q = p / sum(p): selectivity = 1 - H(q) / log(C'), H the Shannon entropy
        (0 log 0 = 0). It is 1 when removing the filter hurts exactly one class, 0 when it hurts all
        classes equally, and 0 for a filter whose removal hurts no class (nothing to be selective
        about: it sorts with the unselective filters, and does not turn means into NaN). With C' = 1 it
        is 1 for a filter that hurts that class.
        """
        valid = ~torch.isnan(self.matrix).all(0)
        p = self.matrix[:, valid].clamp(min=0)
        n = int(valid.sum())
        total = p.sum(1, keepdim=True)
        hurt = total.squeeze(1) > 0
        q = torch.where(total > 0, p / total.clamp(min=1e-300), torch.zeros_like(p))
        entropy = -(torch.where(q > 0, q * q.log(), torch.zeros_like(q))).sum(1)
        sel = 1 - entropy / math.log(n) if n > 1 else torch.ones_like(entropy)
        return torch.where(hurt, sel.clamp(0, 1), torch.zeros_like(sel))

    # ---- export ----------------------------------------------------------------------------------------
    def to_dict(self, top: int = 3) -> dict:
        """Plain JSON-able data (NaN written as None): the matrix, CAR, selectivity and ``per_filter(top)``,
        ``per_class(top)``."""
        def clean(v):
            return None if isinstance(v, float) and math.isnan(v) else v
        return {
            "layer": self.layer, "filters": self.filters.tolist(), "class_names": list(self.class_names),
            "matrix": [[clean(v) for v in row] for row in self.matrix.tolist()],
            "car": [clean(v) for v in self.car.tolist()], "selectivity": self.selectivity().tolist(),
            "per_filter": [{"filter": f, "most": [list(p) for p in d["most"]],
                            "least": [list(p) for p in d["least"]]} for f, d in self.per_filter(top).items()],
            "per_class": {k: [list(p) for p in v] for k, v in self.per_class(top).items()},
        }

    def table(self, top: int = 3) -> str:
        """Readable text: one row per filter (most important first: largest CAR, then lower index) with
        its CAR, selectivity, and of ``per_filter(top)`` the classes that lose accuracy without the filter
        (most first) and those that gain (most first), in % ("-" where none does); classes unchanged by
        the removal are left out of the text (they are in ``per_filter``)."""
        top = _check_top(top, "table")
        sel = self.selectivity().tolist()
        rows = [{"filter": f, **d} for f, d in self.per_filter(top).items()]
        order = sorted(range(len(rows)), key=lambda i: (-float(self.car[i]), rows[i]["filter"]))

        def fmt(pairs, keep):
            return ", ".join(f"{name} {100 * v:+.1f}" for name, v in pairs if keep(v)) or "-"
        lines = [f"Class-wise CAR of {self.layer!r}: {len(rows)} filters x {len(self.class_names)} classes "
                 "(accuracy lost without the filter, %)",
                 f"{'filter':>6}  {'CAR %':>6}  {'select.':>7}  classes that lose  |  classes that gain"]
        for i in order:
            lines.append(f"{rows[i]['filter']:>6}  {100 * float(self.car[i]):>6.2f}  {sel[i]:>7.3f}  "
                         f"{fmt(rows[i]['most'], lambda v: v > 0)}  |  {fmt(rows[i]['least'], lambda v: v < 0)}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.table()
