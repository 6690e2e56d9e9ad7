"""The typed records the scoring methods share: what a chunk of images keeps, and pair counts.

- ``Chunk``: what the prefix pass keeps for a chunk of n images, for every method: the labels, the
  logits and per-image results (top-``topk`` correct, loss) of the model with the removals made so far,
  and the method's own
  tensors: the consumers' gathered inputs ``A`` and outputs ``Z`` and the boundary values ``B`` (suffix
  and closed form, ``graph.split``), or the inputs ``x`` (full network).
- ``ImageResults``: per (scored filter, image) results of a chunk, when asked for (``per_image``).
- ``PairStats``: (filter, image) pairs evaluated, skipped (the filter is all zero on the image) and
  re-run in float32 (low precision), summed over chunks and, with several processes, over them.
- ``remove_at_consumers``: a removal applied to a chunk's cached consumers in place
  (docs/design.md 3.7: Z <- Z - U_k(A_k), A_k <- 0), shared by the suffix and closed-form methods.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from carfast.ops.consumer_delta import consumer_delta, owned_weight
from carfast.ops.score_reduce import pair_loss, pair_results

__all__ = ["Chunk", "ImageResults", "PairStats", "remove_at_consumers"]


@dataclass
class Chunk:
    """One chunk of images as the prefix leaves it (see the module docstring)."""
    y: torch.Tensor                         # [n] int64 labels
    logits: torch.Tensor                    # [n, classes]: the model with the removals made so far
    A: list = field(default_factory=list)   # [n, L, ...] per cached consumer (owned positions, unit by unit)
    Z: list = field(default_factory=list)   # [n, O, ...] per cached consumer
    B: list = field(default_factory=list)   # [n, ...] per boundary value
    x: torch.Tensor | None = None           # [n, ...] the inputs (full network)
    base_correct: torch.Tensor | None = field(default=None, repr=False)   # [n] bool
    base_loss: torch.Tensor | None = field(default=None, repr=False)      # [n] float64
    topk: int = 1                           # an image counts correct when its label is among the top-k logits

    def set_logits(self, logits: torch.Tensor) -> None:
        """New base logits (after a removal), with the per-image results that follow from them."""
        self.logits = logits
        self.base_correct, self.base_loss = pair_results(logits, self.y, self.topk)

    @property
    def num_classes(self) -> int:
        return int(self.logits.shape[1])

    @property
    def num_images(self) -> int:
        return int(self.y.numel())

    def select(self, index: torch.Tensor) -> "Chunk":
        """A new chunk of the images ``index`` [m] int64 (positions in this chunk), every tensor copied."""
        def pick(t):
            return None if t is None else t.index_select(0, index.to(t.device))
        return Chunk(pick(self.y), pick(self.logits), [pick(a) for a in self.A], [pick(z) for z in self.Z],
                     [pick(b) for b in self.B], pick(self.x), pick(self.base_correct), pick(self.base_loss), self.topk)


@dataclass
class ImageResults:
    """Per (scored filter, image) results of one chunk: ``correct`` [F, n] bool (top-``topk``) and ``loss``
    [F, n] float64 (cross-entropy; None unless asked for). ``intact`` starts every pair at the intact
    model's result, which the pairs evaluated then overwrite."""
    correct: torch.Tensor
    loss: torch.Tensor | None = None

    @classmethod
    def intact(cls, chunk: Chunk, num_filters: int, loss: bool) -> "ImageResults":
        return cls(chunk.base_correct.expand(num_filters, -1).clone(),
                   chunk.base_loss.expand(num_filters, -1).clone() if loss else None)

    def set(self, f_b: torch.Tensor, n_b: torch.Tensor, correct: torch.Tensor, logits: torch.Tensor, labels) -> None:
        """Pairs (f_b[p], n_b[p]) evaluated: their correctness [P] and ablated logits [P, classes]."""
        self.correct[f_b, n_b] = correct
        if self.loss is not None:
            self.loss[f_b, n_b] = pair_loss(logits, labels)


@dataclass
class PairStats:
    """(filter, image) pairs evaluated, skipped (free zeros) and re-run in float32."""
    evaluated: int = 0
    skipped: int = 0
    rechecked: int = 0

    def as_list(self) -> list[int]:
        return [self.evaluated, self.skipped, self.rechecked]


def remove_at_consumers(chunk: Chunk, consumers, k: int) -> None:
    """Remove unit ``k`` from the chunk's cached consumers in place: Z -= U_k(A_k), then A_k = 0."""
    for a, z, c in zip(chunk.A, chunk.Z, consumers):
        s, e = c.owned(k)
        if s == e:
            continue
        owned = a.narrow(c.axis, s, e - s)
        z.sub_(consumer_delta(c.spec, owned, owned_weight(c.spec, c.index[s:e])))
        owned.zero_()
