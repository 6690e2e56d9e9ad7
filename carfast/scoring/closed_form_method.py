"""The closed-form method: the consumer is followed by an elementwise epilogue and an affine tail
(``closed_form.py``), so one fused op computes the ablated logits of all (filter, image) pairs and reduces
them to top-1 counts (``ops/closed_form_score.py``); for a Linear consumer, top-k with k > 1 or per-image
losses, the closed form's logits are computed and ``score_reduce`` counts. Float32 always (the
``ScoringMethod`` face: ``method.py``); a removal costs one closed-form pass, so it keeps no memo.
"""
from __future__ import annotations

import torch

from carfast.batching import check_finite
from carfast.ops.score_reduce import pair_loss, score_reduce
from carfast.scoring.chunks import Chunk, ImageResults, remove_at_consumers
from carfast.scoring.method import ABLATED, ScoringMethod
from carfast.scoring.pairs import active_pairs

__all__ = ["ClosedFormMethod"]

_SLICE_ELEMENTS = 1 << 25   # ablated logits materialised at once by the closed form's unfused path


class ClosedFormMethod(ScoringMethod):
    """The closed form of one prepared layer: ``lg`` its ``LayerGraph``, ``cf`` its ``ClosedForm``,
    ``backend`` of the ops, ``prefix_batch`` images per prefix call, ``fn`` the function named in errors."""

    name = "closed_form"

    def __init__(self, lg, cf, backend: str, prefix_batch: int, fn: str):
        self.lg, self.cf, self.backend, self.prefix_batch, self.fn = lg, cf, backend, prefix_batch, fn

    def ablated(self, chunk: Chunk, filt) -> torch.Tensor:
        """[F, n, classes] ablated logits of ``filt`` (the torch / cpu kernels)."""
        logits = chunk.logits
        return self.cf.consumer.closed_form_logits(chunk.A[0], chunk.Z[0], self._residual(chunk), self.cf.tail, logits,
                                                   filt.to(logits.device),
                                                   backend="cpu" if self.backend == "cpu" else "torch")

    def _residual(self, chunk: Chunk):
        """The epilogue's residual [n, O, ...] of the chunk's images, or None."""
        i = self.cf.residual_index
        return chunk.B[i] if i is not None else None

    def remove(self, chunk: Chunk, k: int, removed, known=None) -> None:
        chunk.set_logits(self.ablated(chunk, torch.tensor([k]))[0])   # the removal's closed form is the new base
        remove_at_consumers(chunk, self.lg.consumers, k)

    def score_chunk(self, chunk: Chunk, filt, removed, per_image, stats, bar, *, image_loss: bool = False, memo=None,
                    float32: bool = False):
        cf, y = self.cf, chunk.y
        F_, n = len(filt), y.numel()
        losses = []
        if cf.kind == "conv" and chunk.topk == 1 and not image_loss:    # the fused op counts top-1
            counts, loss, correct = cf.consumer.closed_form_score(chunk.A[0], chunk.Z[0], self._residual(chunk),
                                                                  cf.tail, chunk.logits, filt.to(y.device), y,
                                                                  backend=self.backend)
            if not bool(torch.isfinite(loss).all()):   # a non-finite logit makes its loss non-finite
                check_finite(self.ablated(chunk, filt), self.fn, ABLATED)
        else:   # the ablated logits [f, n, classes] of a slice of filters at a time (at most ~128 MB)
            per = max(1, _SLICE_ELEMENTS // (n * chunk.num_classes))
            parts = []
            for s in range(0, F_, per):
                f = filt[s:s + per]
                abl = self.ablated(chunk, f).reshape(len(f) * n, -1)     # [f * n, classes]
                check_finite(abl, self.fn, ABLATED)
                slots = torch.arange(len(f), device=abl.device).repeat_interleave(n)
                parts.append(score_reduce(abl, y.repeat(len(f)), slots, len(f), backend=self.backend,
                                          topk=chunk.topk))
                if image_loss:
                    losses.append(pair_loss(abl, y.repeat(len(f))).view(len(f), n))
            counts, loss, correct = (torch.cat(t) for t in zip(*parts))
        n_active = int(active_pairs(chunk.A, self.lg.consumers, filt).sum())
        stats.evaluated += n_active
        stats.skipped += F_ * n - n_active
        bar.update(F_ * n)
        images = ImageResults(correct.view(F_, n), torch.cat(losses) if image_loss else None) if per_image else None
        return counts, loss.sum(1), images
