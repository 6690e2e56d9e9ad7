"""The full-network method: for models torch.fx cannot trace, the whole network reruns per filter with the
removal applied at the readers (``graph.apply``): the naive method, exact by construction, float32 (the
``ScoringMethod`` face: ``method.py``).
"""
from __future__ import annotations

import torch

from carfast.batching import check_finite
from carfast.graph.apply import applied
from carfast.graph.masking import keep_mask
from carfast.ops.score_reduce import score_reduce
from carfast.scoring.chunks import Chunk, ImageResults
from carfast.scoring.method import ABLATED, ScoringMethod

__all__ = ["FullNetworkMethod"]


class FullNetworkMethod(ScoringMethod):
    """The whole model rerun per filter: ``model`` (the scorer's copy), ``flow`` (recorded front end),
    ``pair_batch`` images per run, ``backend`` of ``score_reduce``."""

    name = "full_network"

    def __init__(self, model, flow, pair_batch: int, backend: str, fn: str):
        self.model, self.flow, self.pair_batch, self.backend, self.fn = model, flow, pair_batch, backend, fn

    def run_removed(self, x, units) -> torch.Tensor:
        """Logits [n, classes] of the whole model with ``units`` removed (none: the model as it is)."""
        def run():
            return torch.cat([self.model(x[s:s + self.pair_batch]) for s in range(0, x.shape[0], self.pair_batch)])
        if not units:
            return run()
        with applied(self.model, self.flow, keep_mask(None, units, self.flow.num_units, x.device)):
            return run()

    def prefix(self, x, y) -> Chunk:
        return Chunk(y, self.run_removed(x, []), x=x)

    def remove(self, chunk: Chunk, k: int, removed, known=None) -> None:
        chunk.set_logits(self.run_removed(chunk.x, removed))

    def catch_up(self, chunk: Chunk, removed) -> None:
        if removed:                        # one rerun with every removal made so far
            chunk.set_logits(self.run_removed(chunk.x, removed))

    def score_chunk(self, chunk: Chunk, filt, removed, per_image, stats, bar, *, image_loss: bool = False, memo=None,
                    float32: bool = False):
        y = chunk.y
        counts = torch.zeros(len(filt), chunk.num_classes, dtype=torch.long, device=y.device)
        loss = torch.zeros(len(filt), dtype=torch.float64, device=y.device)
        images = ImageResults.intact(chunk, len(filt), image_loss)
        slots = torch.zeros_like(y)
        every = torch.arange(y.numel(), device=y.device)
        for f, k in enumerate(filt.tolist()):
            abl = self.run_removed(chunk.x, list(removed) + [k])
            check_finite(abl, self.fn, ABLATED)
            c, l, correct = score_reduce(abl, y, slots, 1, backend=self.backend, topk=chunk.topk)
            counts[f], loss[f] = c[0], l.sum()
            images.set(torch.full_like(every, f), every, correct, abl, y)
            bar.update(y.numel())
        stats.evaluated += y.numel() * len(filt)
        return counts, loss, images if per_image else None
