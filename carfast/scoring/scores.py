"""``LayerScores``: what scoring one layer's filters yields, as plain tensors and derived views."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from carfast.scoring.selection import DEFAULT_RULE, rule_keys

__all__ = ["LayerScores"]

#: what each selection rule ranks by, for the table's header
_RANKED_BY = {"loss": "loss + smallest first (not by CAR)",
              "accuracy": "accuracy % highest first (CAR % smallest first), then loss +",
              "lcb": "a lower confidence bound of accuracy % highest first (not by CAR)"}


@dataclass
class LayerScores:
    """CAR scores of a layer's filters.

    Counted fields (integers, so shards over batches or processes add up exactly):
        layer:          name of the scored layer in ``model.named_modules()``.
        filters:        [F] int64, the scored filter (output channel / feature) indices.
        num_images:     N, images scored.
        class_totals:   [C] int64, images per class.
        base_correct:   [C] int64, images of each class the intact model classifies correctly.
        correct:        [F, C] int64, images of each class classified correctly with filter f removed.
        topk:           what "correctly" means: the label is among the ``topk`` largest logits (1: top-1).
        base_loss_sum:  float, summed cross-entropy of the intact model (float64 accumulation).
        loss_sum:       [F] float64, summed cross-entropy with filter f removed.
    Derived: ``base_accuracy``, ``accuracy`` [F], ``car`` [F], ``class_car`` [F, C], ``loss_increase`` [F].
    Units: accuracies and ``car`` / ``class_car`` are FRACTIONS (0.012 = 1.2 points of accuracy lost); the
    printed tables (``table``, ``print(scores)``) show them in percent; ``loss_increase`` is in nats (mean
    cross-entropy). ``table`` and ``ranking`` order filters by the selection rule (default "loss": by the
    loss increase, not by CAR), least important first.

    Provenance: ``coupled`` is always False from ``score_layer`` (it refuses layers whose channels are
    coupled through a residual add) and True from ``score_group`` for a real coupling group, whose
    ``filters`` are then the group's channels and ``members`` (plain dicts: layer, role, channels,
    width; ``carfast.graph.GroupMember``) its layers and how the channels map onto each; ``method``
    says how the ablations were evaluated ("closed_form", "suffix", "full_network" or "group_suffix"),
    ``backend`` which kernels ran; ``pairs_skipped`` counts the (filter,
    image) pairs whose result is the intact one because the filter's activation is all zero on that
    image (free zeros: the suffix and the compiled kernels do no work for them; the plain-PyTorch
    closed form computes them anyway; the full-network path does not look for them and counts every
    pair as evaluated), ``pairs_evaluated`` the rest; ``backend_note`` why ``backend`` is not the one asked
    for ("" when it is). With ``per_image=True``: ``image_correct`` [F, N] bool and ``base_image_correct``
    [N] bool, in data order; with ``image_loss=True`` (``LayerScorer.score``) also ``image_loss`` [F, N] float64,
    each pair's cross-entropy.
    """

    layer: str
    filters: torch.Tensor
    num_images: int
    class_totals: torch.Tensor
    base_correct: torch.Tensor
    correct: torch.Tensor
    base_loss_sum: float
    loss_sum: torch.Tensor
    coupled: bool = False
    method: str = ""
    backend: str = ""
    pairs_evaluated: int = 0
    pairs_skipped: int = 0
    seconds: float = 0.0
    precision: str = "fp32"
    pairs_rechecked: int = 0
    margin_threshold: float = 0.0
    members: list | None = None
    topk: int = 1
    image_correct: torch.Tensor | None = field(default=None, repr=False)
    base_image_correct: torch.Tensor | None = field(default=None, repr=False)
    backend_note: str = ""
    image_loss: torch.Tensor | None = field(default=None, repr=False)

    # ---- derived -------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return int(self.class_totals.numel())

    @property
    def accuracy_name(self) -> str:
        """"accuracy" (top-1) or "top-k accuracy", for labels."""
        return "accuracy" if self.topk == 1 else f"top-{self.topk} accuracy"

    @property
    def base_accuracy(self) -> float:
        """Top-``topk`` accuracy of the intact model (fraction in [0, 1])."""
        return int(self.base_correct.sum()) / self.num_images

    @property
    def accuracy(self) -> torch.Tensor:
        """[F] float64: top-``topk`` accuracy with each filter removed."""
        return self.correct.sum(1).double() / self.num_images

    @property
    def car(self) -> torch.Tensor:
        """[F] float64: the CAR index, base accuracy minus accuracy without the filter (can be < 0), as a
        FRACTION (0.012: 1.2 points lost; tables print it as "CAR %", 100 x this)."""
        return self.base_accuracy - self.accuracy

    @property
    def class_car(self) -> torch.Tensor:
        """[F, C] float64: per-class accuracy reduction; NaN for a class with no images."""
        totals = self.class_totals.double()
        base = self.base_correct.double() / totals
        return base.unsqueeze(0) - self.correct.double() / totals.unsqueeze(0)

    @property
    def base_loss(self) -> float:
        """Mean cross-entropy of the intact model."""
        return self.base_loss_sum / self.num_images

    @property
    def loss_increase(self) -> torch.Tensor:
        """[F] float64: mean cross-entropy with the filter removed minus without."""
        return (self.loss_sum - self.base_loss_sum) / self.num_images

    def ranking(self, rule: str | None = None) -> torch.Tensor:
        """[F] int64 filter indices, least important first, under the selection ``rule``
        (``carfast.scoring.selection``; None: ``DEFAULT_RULE``, the order ``carfast.prune`` removes in).

        "loss": smallest loss with the filter removed, then most images still correct; "accuracy" (the
        paper's): most images still correct, then smallest loss; then the lowest filter index. The greedy
        CAR step removes ``ranking(rule)[0]``.
        """
        keys, filters = rule_keys(self, DEFAULT_RULE if rule is None else rule), self.filters.tolist()
        order = sorted(range(len(filters)), key=lambda i: (keys[i], filters[i]))
        return self.filters[torch.tensor(order, dtype=torch.long)]

    # ---- export --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Plain JSON-able data: counts, derived scores and provenance."""
        d = {
            "layer": self.layer, "filters": self.filters.tolist(), "num_images": self.num_images,
            "class_totals": self.class_totals.tolist(), "base_correct": self.base_correct.tolist(),
            "correct": self.correct.tolist(), "base_loss_sum": self.base_loss_sum,
            "loss_sum": self.loss_sum.tolist(), "base_accuracy": self.base_accuracy,
            "accuracy": self.accuracy.tolist(), "car": self.car.tolist(),
            "loss_increase": self.loss_increase.tolist(), "ranking": self.ranking().tolist(),
            "coupled": self.coupled, "method": self.method, "backend": self.backend,
            "pairs_evaluated": self.pairs_evaluated, "pairs_skipped": self.pairs_skipped,
            "seconds": self.seconds, "precision": self.precision, "pairs_rechecked": self.pairs_rechecked,
            "margin_threshold": self.margin_threshold, "members": self.members, "topk": self.topk,
            "backend_note": self.backend_note,
        }
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LayerScores":
        """Rebuild from ``to_dict()`` output (the counted fields and provenance; not per-image results)."""
        t = torch.tensor
        return cls(d["layer"], t(d["filters"], dtype=torch.long), int(d["num_images"]),
                   t(d["class_totals"], dtype=torch.long), t(d["base_correct"], dtype=torch.long),
                   t(d["correct"], dtype=torch.long).view(len(d["filters"]), len(d["class_totals"])),
                   float(d["base_loss_sum"]), t(d["loss_sum"], dtype=torch.float64), d.get("coupled", False),
                   d.get("method", ""), d.get("backend", ""), d.get("pairs_evaluated", 0), d.get("pairs_skipped", 0),
                   d.get("seconds", 0.0), d.get("precision", "fp32"), d.get("pairs_rechecked", 0),
                   d.get("margin_threshold", 0.0), d.get("members"), topk=int(d.get("topk", 1)),
                   backend_note=d.get("backend_note", ""))

    def table(self, top: int | None = None, rule: str | None = None) -> str:
        """A readable table, filters in ranking order (least important first) under the selection ``rule``
        (``ranking``; default "loss"); its header says the order and the units."""
        rule = DEFAULT_RULE if rule is None else rule
        order = self.ranking(rule).tolist()
        pos = {int(f): i for i, f in enumerate(self.filters.tolist())}
        acc, car, dloss = self.accuracy, self.car, self.loss_increase
        lines = [f"CAR scores of {self.layer!r}: {len(order)} filters on {self.num_images} images, "
                 f"base {self.accuracy_name} {100 * self.base_accuracy:.2f} %  "
                 f"({self.method}, {self.backend}, {self.precision})"]
        if self.backend_note:
            lines.append(f"backend {self.backend}: {self.backend_note}")
        lines += [f"order: least important first, by {_RANKED_BY[rule]}: rule {rule!r}"
                  f"{', the order carfast.prune removes in by default' if rule == DEFAULT_RULE else ''}",
                  f"units: accuracy % and CAR % in percent (CAR % = 100 x .car, which is a fraction: the "
                  f"{self.accuracy_name} lost without the filter); loss + = mean cross-entropy increase (nats)",
                 f"{'rank':>4}  {'filter':>6}  {'accuracy %':>10}  {'CAR %':>7}  {'loss +':>9}"]
        shown = order if top is None or top >= len(order) else order[:top]
        for r, f in enumerate(shown):
            i = pos[f]
            lines.append(f"{r:>4}  {f:>6}  {100 * float(acc[i]):>10.2f}  {100 * float(car[i]):>7.2f}  "
                         f"{float(dloss[i]):>9.5f}")
        if len(shown) < len(order):
            lines.append(f"  ... {len(order) - len(shown)} more (most important last)")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.table(top=20)
