"""The scoring methods besides the suffix (``suffix_eval.SuffixMethod``), one object each, with the same
face: ``prefix(x) -> Chunk``, ``remove(chunk, k, removed, known=None)`` (a greedy removal applied to a cached
chunk in place; ``known``: logits the scoring kept for it, ``logit_memo``), ``catch_up(chunk, removed)`` (a
fresh chunk gets the removals made so far) and ``score_chunk(chunk, filt, removed, per_image, stats, bar,
image_loss=False, memo=None) -> (counts [F, C], loss sums [F], ``chunks.ImageResults`` or None)``: per-image
correctness with ``per_image``, and losses too with ``image_loss``; ``memo``: a dict the method may fill with
the pairs' logits for the removal (only the suffix method does; these two compute a removal cheaply).

- ``ClosedFormMethod``: the consumer is followed by an elementwise epilogue and an affine tail
  (``closed_form.py``); one fused op computes the ablated logits of all (filter, image) pairs and reduces
  them to top-1 counts (``ops/closed_form_score.py``), or, for a Linear consumer or top-k with k > 1,
  the reference computes them and ``score_reduce`` counts.
- ``FullNetworkMethod``: for models torch.fx cannot trace, the whole network reruns per filter with the
  removal applied at the readers (``graph.apply``), the naive method, exact by construction.
"""
from __future__ import annotations

import torch

from carfast.batching import check_finite
from carfast.graph.apply import applied
from carfast.graph.masking import keep_mask
from carfast.ops.closed_form_linear import closed_form_linear_ref
from carfast.ops.closed_form_logits import closed_form_logits
from carfast.ops.closed_form_score import closed_form_score
from carfast.ops.score_reduce import pair_loss, score_reduce
from carfast.scoring.chunks import Chunk, ImageResults, remove_at_consumers
from carfast.scoring.pairs import active_pairs

__all__ = ["ClosedFormMethod", "FullNetworkMethod", "prefix_chunk"]

_WHAT = "the model's output with a filter removed"
_SLICE_ELEMENTS = 1 << 25   # ablated logits materialised at once by the closed form's unfused path


def prefix_chunk(lg, x: torch.Tensor, y: torch.Tensor, batch: int) -> Chunk:
    """The ``Chunk`` of images ``x`` [n, ...] (labels ``y``): ``lg.prefix`` run ``batch`` images at a time."""
    parts = [lg.prefix(x[s:s + batch]) for s in range(0, x.shape[0], batch)]
    outs = [torch.cat(p) for p in zip(*parts)] if len(parts) > 1 else list(parts[0])
    u = len(lg.consumers)
    return Chunk(y, outs[-1], A=outs[:u], Z=outs[u:2 * u], B=outs[2 * u:-1])


class ClosedFormMethod:
    """The closed form of one prepared layer: ``lg`` its ``LayerGraph``, ``cf`` its ``ClosedForm``,
    ``backend`` of the ops, ``prefix_batch`` images per prefix call, ``fn`` the function named in errors."""

    name = "closed_form"
    precision = "fp32"
    margin_threshold = 0.0

    def __init__(self, lg, cf, backend: str, prefix_batch: int, fn: str):
        self.lg, self.cf, self.backend, self.prefix_batch, self.fn = lg, cf, backend, prefix_batch, fn

    def prefix(self, x, y) -> Chunk:
        return prefix_chunk(self.lg, x, y, self.prefix_batch)

    def ablated(self, chunk: Chunk, filt) -> torch.Tensor:
        """[F, n, classes] ablated logits of ``filt`` (the torch / cpu kernels)."""
        cf, A, Z, logits = self.cf, chunk.A, chunk.Z, chunk.logits
        R = chunk.B[cf.residual_index] if cf.residual_index is not None else None
        if cf.kind == "linear":
            return closed_form_linear_ref(A[0], cf.weight, cf.width, Z[0], cf.scale, cf.shift, R, cf.act, cf.tail,
                                          logits, filt.to(logits.device))
        return closed_form_logits(A[0], cf.weight, Z[0], cf.scale, cf.shift, R, cf.act, cf.tail, logits,
                                  filt.to(logits.device), cf.stride, cf.padding, cf.dilation,
                                  backend="cpu" if self.backend == "cpu" else "torch")

    def remove(self, chunk: Chunk, k: int, removed, known=None) -> None:
        chunk.set_logits(self.ablated(chunk, torch.tensor([k]))[0])   # the removal's closed form is the new base
        remove_at_consumers(chunk, self.lg.consumers, k)

    def catch_up(self, chunk: Chunk, removed) -> None:
        for i, k in enumerate(removed):
            self.remove(chunk, k, removed[:i + 1])

    def score_chunk(self, chunk: Chunk, filt, removed, per_image, stats, bar, image_loss: bool = False, memo=None):
        cf, y = self.cf, chunk.y
        F_, n = len(filt), y.numel()
        losses = []
        if cf.kind == "conv" and chunk.topk == 1 and not image_loss:    # the fused op counts top-1
            R = chunk.B[cf.residual_index] if cf.residual_index is not None else None
            counts, loss, correct = closed_form_score(chunk.A[0], cf.weight, chunk.Z[0], cf.scale, cf.shift, R, cf.act,
                                                      cf.tail, chunk.logits, filt.to(y.device), y, cf.stride,
                                                      cf.padding, cf.dilation, backend=self.backend)
            if not bool(torch.isfinite(loss).all()):   # a non-finite logit makes its loss non-finite
                check_finite(self.ablated(chunk, filt), self.fn, _WHAT)
        else:   # the ablated logits [f, n, classes] of a slice of filters at a time (at most ~128 MB)
            per = max(1, _SLICE_ELEMENTS // (n * chunk.num_classes))
            parts = []
            for s in range(0, F_, per):
                f = filt[s:s + per]
                abl = self.ablated(chunk, f).reshape(len(f) * n, -1)     # [f * n, classes]
                check_finite(abl, self.fn, _WHAT)
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


class FullNetworkMethod:
    """The whole model rerun per filter: ``model`` (the scorer's copy), ``flow`` (recorded front end),
    ``pair_batch`` images per run, ``backend`` of ``score_reduce``."""

    name = "full_network"
    precision = "fp32"
    margin_threshold = 0.0

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

    def score_chunk(self, chunk: Chunk, filt, removed, per_image, stats, bar, image_loss: bool = False, memo=None):
        y = chunk.y
        counts = torch.zeros(len(filt), chunk.num_classes, dtype=torch.long, device=y.device)
        loss = torch.zeros(len(filt), dtype=torch.float64, device=y.device)
        images = ImageResults.intact(chunk, len(filt), image_loss)
        slots = torch.zeros_like(y)
        every = torch.arange(y.numel(), device=y.device)
        for f, k in enumerate(filt.tolist()):
            abl = self.run_removed(chunk.x, list(removed) + [k])
            check_finite(abl, self.fn, _WHAT)
            c, l, correct = score_reduce(abl, y, slots, 1, backend=self.backend, topk=chunk.topk)
            counts[f], loss[f] = c[0], l.sum()
            images.set(torch.full_like(every, f), every, correct, abl, y)
            bar.update(y.numel())
        stats.evaluated += y.numel() * len(filt)
        return counts, loss, images if per_image else None
