"""``PruneResult``: what ``carfast.prune`` returns, its summary, and saving / loading it.

The saved file holds the pruned model's shapes and weights and the run's plain-data record (removed
and kept filters, history, settings); it loads with ``torch.load(weights_only=True)``: no pickled code.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from torch import nn

from carfast.scoring.scores import LayerScores
from carfast.surgery.pruned_io import read_pruned, save_pruned

__all__ = ["PruneResult", "PruneSummary", "load_pruned", "kept_percent"]

_FORMAT = "carfast-prune-result/1"


def kept_percent(after: int, before: int) -> str:
    """``after`` of ``before`` as a share kept: "75 %", "87.5 %", "66.7 %" ("-" when ``before`` is 0)."""
    if not before:
        return "-"
    return f"{100.0 * after / before:.1f}".removesuffix(".0") + " %"


@dataclass
class PruneSummary:
    """Sizes and accuracy of the model before and after pruning (accuracy on the ``num_images`` scoring
    images the filters were chosen on, labelled so in the table: not a held-out figure)."""
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    accuracy_before: float
    accuracy_after: float
    filters_before: dict
    filters_after: dict
    accuracy_finetuned: float | None = None
    stops: dict = field(default_factory=dict)     # {layer: why it stopped before its keep}
    groups: list = field(default_factory=list)    # layers pruned as their coupling group (rows in channels)
    topk: int = 1                                 # the accuracy counted: top-1, or top-k
    num_images: int | None = None                 # scoring images the accuracies are measured on
    evaluations: int | None = None                # CAR's candidate-image evaluations (None: not recorded)
    exhaustive: int | None = None                 # those the exact search makes (equal unless search="race")

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def layer_lines(self) -> list[str]:
        """One line per layer: ``layer1.2.conv1 filters  16 -> 12  (kept 75 %, removed 4)``."""
        heads = {layer: f"{layer} {'group channels' if layer in self.groups else 'filters'}"
                 for layer in self.filters_before}
        wh = max(len(h) for h in heads.values())
        wb = max(len(str(b)) for b in self.filters_before.values())
        wa = max(len(str(a)) for a in self.filters_after.values())
        out = []
        for layer, before in self.filters_before.items():
            after = self.filters_after[layer]
            out.append(f"  {heads[layer]:<{wh}}  {before:>{wb}} -> {after:<{wa}}  (kept {kept_percent(after, before)}"
                       f", removed {before - after})")
        return out

    def __str__(self) -> str:
        def ratio(a, b):
            return f"{a / b:.2f}x" if b else "-"
        # the accuracy of the images the filters were chosen on (flattering), not held out
        scoring = "scoring images" if self.num_images is None else f"{self.num_images:,} scoring images"
        rows = [("", "before", "after", "ratio"),
                ("params", f"{self.params_before:,}", f"{self.params_after:,}",
                 ratio(self.params_after, self.params_before)),
                ("MACs", f"{self.macs_before:,}", f"{self.macs_after:,}", ratio(self.macs_after, self.macs_before)),
                (f"top-{self.topk} % ({scoring})", f"{100 * self.accuracy_before:.2f}",
                 f"{100 * self.accuracy_after:.2f}", f"{100 * (self.accuracy_after - self.accuracy_before):+.2f} pts")]
        if self.accuracy_finetuned is not None:
            rows.append((f"fine-tuned top-{self.topk} % ({scoring})", "", f"{100 * self.accuracy_finetuned:.2f}",
                         f"{100 * (self.accuracy_finetuned - self.accuracy_before):+.2f} pts"))
        w0 = max(len(r[0]) for r in rows)
        w = [max(len(r[i]) for r in rows) for i in (1, 2, 3)]
        lines = [f"{r[0]:<{w0}}  {r[1]:>{w[0]}}  {r[2]:>{w[1]}}  {r[3]:>{w[2]}}" for r in rows]
        if self.filters_before:
            lines.append("per layer, before -> after (keep is the share KEPT; a pruning ratio is the share removed):")
            lines += self.layer_lines()
        if self.evaluations is not None and self.exhaustive:
            lines.append(f"CAR's work: {self.evaluations:,} candidate-image evaluations"
                         + ("" if self.evaluations == self.exhaustive else
                            f", {self.evaluations / self.exhaustive:.1%} of the exact search's {self.exhaustive:,}"))
        for layer, why in self.stops.items():
            lines.append(f"{layer}: stopped at {why['remaining']} by max_accuracy_drop (the next removal would "
                         f"leave {100 * why['accuracy_after_next']:.2f} % < {100 * why['threshold']:.2f} %)")
        return "\n".join(lines)


@dataclass
class PruneResult:
    """The outcome of ``carfast.prune``.

    model:    a new, physically smaller ``nn.Module`` (the input model is never changed).
    removed:  {layer: [original filter indices, in removal order]}.
    kept:     {layer: [original filter indices kept, ascending]}.
    history:  one dict per removal: ``step``, ``layer``, ``filter`` (original index: of the layer's
              filters, or of its group's channels for a group target), ``correct``, ``accuracy`` and
              ``loss`` (mean cross-entropy) of the model after it, ``remaining`` (units left in that target),
              ``seconds`` (time to choose and apply it); with CAR also
              ``evaluations`` (candidate-image evaluations made towards it) and ``exhaustive`` (those the
              exact search makes: equal, unless ``search="race"``).
    base:     {"accuracy", "loss", "num_images"} of the input model on the scoring data.
    settings: the run's settings (layers, keep, step, schedule, criterion, ...), plain data.
    stats:    {"before": {"params", "macs"}, "after": {...}}, counted at ``settings["input_shape"]``.
    finetuned_accuracy: accuracy on the scoring data after ``finetune`` (None when not fine-tuned).
    scores:   {layer: LayerScores} of each layer's first CAR scoring (all its filters, before any of them
              was removed): the class-wise view of the layer (``carfast.ClassImportance``). With
              ``search="race"``, only the first race's survivors, the filters it scored on every image
              (``scores[layer].filters`` names them; ``carfast.score_layer`` scores all). Empty for
              other criteria and for layers whose removals were all replayed from a checkpoint.
    stops:    {layer: {"reason", "remaining", "accuracy_after_next", "threshold", "iteration"}} for each
              layer that stopped before its ``keep`` (``max_accuracy_drop``).
    comparison: None, or the plain-data record of other criteria pruning the same layers to the same
              sizes, measured on held-out images (``carfast.compare_criteria``; ``CriteriaComparison.to_dict``):
              {"held_out_images", "selection_images", "unpruned_held_out_accuracy",
              "unpruned_selection_accuracy", "filters", "rows": [{"criterion", "held_out_accuracy",
              "selection_accuracy", "removed"}, ...]}. Saved with the result; the report draws it.
    A layer listed as a coupling group (``settings["groups"]``) has its group's channels in ``removed`` /
    ``kept`` (``score_group``'s indices).
    """
    model: nn.Module
    removed: dict
    kept: dict
    history: list
    base: dict
    settings: dict
    stats: dict = field(default_factory=dict)
    finetuned_accuracy: float | None = None
    scores: dict = field(default_factory=dict)
    stops: dict = field(default_factory=dict)
    comparison: dict | None = None

    @property
    def accuracy(self) -> float:
        """Accuracy on the scoring data after the last removal (before any fine-tuning)."""
        return self.history[-1]["accuracy"] if self.history else self.base["accuracy"]

    def summary(self) -> PruneSummary:
        """Params, MACs and accuracy before and after, and filters (a group's channels) per layer."""
        before = {layer: len(self.removed[layer]) + len(self.kept[layer]) for layer in self.kept}
        return PruneSummary(self.stats["before"]["params"], self.stats["after"]["params"],
                            self.stats["before"]["macs"], self.stats["after"]["macs"], self.base["accuracy"],
                            self.accuracy, before, {layer: len(k) for layer, k in self.kept.items()},
                            self.finetuned_accuracy, dict(self.stops), list(self.settings.get("groups", [])),
                            int(self.settings.get("topk", 1)), self.base.get("num_images"),
                            *self.work())

    def work(self) -> tuple[int | None, int | None]:
        """(candidate-image evaluations CAR made, those the exact search makes), summed over the history;
        (None, None) when the history does not count them (a baseline criterion, or an older record)."""
        if not self.history or any("evaluations" not in h for h in self.history):
            return None, None
        return sum(h["evaluations"] for h in self.history), sum(h["exhaustive"] for h in self.history)

    def record(self) -> dict:
        """Everything but the model, as plain data (JSON-able)."""
        return {"format": _FORMAT, "removed": self.removed, "kept": self.kept, "history": self.history,
                "base": self.base, "settings": self.settings, "stats": self.stats,
                "finetuned_accuracy": self.finetuned_accuracy, "stops": self.stops,
                "scores": {layer: s.to_dict() for layer, s in self.scores.items()},
                "comparison": self.comparison}

    def save(self, path: str | os.PathLike) -> None:
        """Write the pruned model and the run's record to ``path`` (atomically); see ``load_pruned``."""
        save_pruned(self.model, path, extra=self.record())

    def __repr__(self) -> str:
        layers = ", ".join(f"{k}: {len(v)} kept" for k, v in self.kept.items())
        return f"PruneResult({layers}; {len(self.history)} removals)\n{self.summary()}"


def load_pruned(path: str | os.PathLike, model: nn.Module | None = None) -> PruneResult:
    """Load a ``PruneResult`` written by ``PruneResult.save`` (a network alone, written by ``carfast.save_pruned``,
    loads with ``carfast.load_pruned_model``).

    The architecture is rebuilt from the file's record for carfast's own models; for another model pass
    ``model=``, an unpruned instance of the same architecture (it is copied, not changed), and the
    recorded pruned shapes and weights are applied to the copy.
    """
    pruned, extra = read_pruned(path, model, "load_pruned")
    if not isinstance(extra, dict) or extra.get("format") != _FORMAT:
        raise ValueError(f"load_pruned: {os.fspath(path)!r} holds a pruned model but no prune record "
                         f"(format {extra.get('format') if isinstance(extra, dict) else None!r}); load it with "
                         "carfast.load_pruned_model instead")
    return PruneResult(pruned, extra["removed"], extra["kept"], extra["history"], extra["base"], extra["settings"],
                       extra.get("stats", {}), extra.get("finetuned_accuracy"),
                       {layer: LayerScores.from_dict(d) for layer, d in extra.get("scores", {}).items()},
                       extra.get("stops", {}), extra.get("comparison"))
