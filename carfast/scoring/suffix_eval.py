"""The suffix method: (filter, image) pairs through the rest of the network, many per call, optionally in
low precision.

``SuffixMethod`` holds what one layer's suffix needs across ``score`` calls: the optimised suffix (or,
with the fused consumer of ``fused_suffix.py``, the ``ablated_consumer`` op and the network after the
consumer's epilogue), its low-precision copies, the calibrated re-run margin of ``precision.py``, and
each consumer's weight restricted to each filter's inputs. Per chunk of images it evaluates only the
active pairs (the filter is not all zero on the image; every pair where readers inside the suffix read
the filter through a mask), in batches, and reduces each batch's logits to per-(filter, class) counts
and loss sums (``ops/score_reduce.py``); the inactive pairs take the intact result
(``pairs.intact_counts``). Its face is ``method.ScoringMethod``.
"""
from __future__ import annotations

import copy

import torch

from carfast.graph.masking import keep_mask
from carfast.ops.consumer_delta import owned_weight
from carfast.scoring.chunks import Chunk, ImageResults, PairStats, remove_at_consumers
from carfast.scoring.method import ABLATED, ScoringMethod
from carfast.scoring.pairs import (
    active_pairs,
    intact_counts,
    reduce_pair_batch,
    run_suffix,
    suffix_base_logits,
    suffix_logits,
)
from carfast.scoring.precision import CALIBRATION_PAIRS, margin_threshold, topk_margin

__all__ = ["SuffixMethod"]


class SuffixMethod(ScoringMethod):
    """The suffix method of one prepared layer (see the module docstring).

    lg: the ``LayerGraph``; suffix: its optimised float32 suffix (Z, B[, keep]) -> logits; fused: a
    ``FusedConsumer`` or None; channels_last: the suffix's layout; dtype: the suffix's arithmetic
    (float32, bfloat16 or float16); backend: of the ops; pair_batch: pairs per call; prefix_batch: images
    per prefix call; fn: the function named in errors. ``threshold`` is the re-run margin, set on the
    first chunk scored in low precision.
    """

    name = "suffix"

    def __init__(self, lg, suffix, fused, channels_last: bool, dtype: torch.dtype, backend: str, pair_batch: int,
                 prefix_batch: int, precision: str, fn: str):
        self.lg, self.suffix, self.fused = lg, suffix, fused
        self.channels_last, self.dtype, self.backend, self.pair_batch = channels_last, dtype, backend, pair_batch
        self.prefix_batch, self.precision, self.fn = prefix_batch, precision, fn
        self.threshold: float | None = None
        self._low = {}       # low-precision copies of the suffix (or of fused.post), made on first use
        self._weights = {}   # (consumer index, unit) -> the consumer's weight over the unit's inputs

    @property
    def margin_threshold(self) -> float:
        return float(self.threshold or 0.0)

    # ---- the chunk ---------------------------------------------------------------------------------------
    def remove(self, chunk: Chunk, k: int, removed, known=None) -> None:
        """Remove filter ``k`` from ``chunk`` in place. The new logits are run through the suffix only for
        the images where the removal changes something: an image where k is all zero at the consumers
        keeps its logits (its suffix inputs do not change; unless readers inside the suffix read k through
        a mask), and so does one whose logits the scoring kept: ``known`` = (logits [n, classes], seen [n]
        bool) from ``logit_memo``."""
        n = chunk.num_images
        todo = torch.ones(n, dtype=torch.bool, device=chunk.y.device) if self.lg.masked else \
            active_pairs(chunk.A, self.lg.consumers, torch.tensor([k]))[0]
        remove_at_consumers(chunk, self.lg.consumers, k)
        keep = keep_mask(None, removed, self.lg.num_filters, chunk.y.device) if self.lg.masked else None
        if known is not None:
            todo = todo & ~known[1]
        at = todo.nonzero().flatten()
        if at.numel() == n:                      # every image: the plain pass, without gathered copies
            chunk.set_logits(suffix_base_logits(self.suffix, chunk.Z, chunk.B, self.pair_batch, self.channels_last,
                                                keep))
            return
        logits = chunk.logits.clone()
        if known is not None:
            logits[known[1]] = known[0][known[1]]
        if at.numel():
            logits[at] = suffix_base_logits(self.suffix, [z[at] for z in chunk.Z], [b[at] for b in chunk.B],
                                            self.pair_batch, self.channels_last, keep)
        chunk.set_logits(logits)

    # ---- scoring -------------------------------------------------------------------------------------------
    def _weights_of(self, filt) -> list:
        """weights[u][f]: consumer u's weight restricted to filter filt[f]'s inputs (made once per filter)."""
        out = []
        for ui, c in enumerate(self.lg.consumers):
            row = []
            for k in filt.tolist():
                if (ui, k) not in self._weights:
                    self._weights[(ui, k)] = owned_weight(c.spec, c.index[slice(*c.owned(k))]).detach()
                row.append(self._weights[(ui, k)])
            out.append(row)
        return out

    def score_chunk(self, chunk: Chunk, filt, removed, per_image: bool, stats: PairStats, bar, *,
                    image_loss: bool = False, memo: dict | None = None, float32: bool = False):
        """(counts [F, C], loss sums [F], ``ImageResults`` or None) of one chunk, ``removed`` made already.
        ``memo``: a dict to receive the evaluated pairs' logits for a later removal (``logit_memo``):
        "logits" [F, n, classes] float32 and "evaluated" [F, n] bool, set where this method's arithmetic is
        the removal pass's (float32, unfused, no masked readers). ``float32``: the suffix in float32 whatever
        the method's precision."""
        dtype = torch.float32 if float32 else self.dtype
        y, A = chunk.y, chunk.A
        F_, C = len(filt), chunk.num_classes
        weights = self._weights_of(filt)
        if self.lg.masked:   # readers inside the suffix: a filter zero at the consumers may still matter there
            active = torch.ones(F_, y.numel(), dtype=torch.bool, device=y.device)
        else:
            active = active_pairs(A, self.lg.consumers, filt)
        fi, ni = active.nonzero(as_tuple=True)
        low = dtype != torch.float32
        if low and self.threshold is None and fi.numel():
            self._calibrate(chunk, filt, weights, removed, fi, ni)
        counts = torch.zeros(F_, C, dtype=torch.long, device=y.device)
        loss = torch.zeros(F_, dtype=torch.float64, device=y.device)
        images = ImageResults.intact(chunk, F_, image_loss) if per_image else None
        kept = None
        if memo is not None and not low and self.fused is None and not self.lg.masked:
            kept = torch.empty(F_, y.numel(), C, dtype=torch.float32, device=y.device)
            memo.update(logits=kept, evaluated=active)
        for s in range(0, fi.numel(), self.pair_batch):
            f_b, n_b = fi[s:s + self.pair_batch], ni[s:s + self.pair_batch]
            abl = self._pair_logits(chunk, filt, weights, removed, f_b, n_b, dtype)
            if kept is not None:
                kept[f_b, n_b] = abl
            if low:
                redo = (topk_margin(abl, chunk.topk) <= self.threshold).nonzero().flatten()
                abl = abl.float()
                if redo.numel():
                    abl[redo] = self._exact_logits(chunk, filt, weights, removed, f_b[redo], n_b[redo])
                stats.rechecked += redo.numel()
            reduce_pair_batch(abl, y[n_b], f_b, n_b, counts, loss, images, self.backend, self.fn, ABLATED,
                              chunk.topk)
            bar.update(f_b.numel())
        c, l = intact_counts(~active, chunk.base_correct, chunk.base_loss, y, C)
        total = F_ * y.numel()
        stats.evaluated += fi.numel()
        stats.skipped += total - fi.numel()
        bar.update(total - fi.numel())
        return counts + c, loss + l, images

    def _low_copy(self, module):
        """``module`` in ``self.dtype`` (made once)."""
        key = id(module)
        if key not in self._low:
            self._low[key] = copy.deepcopy(module).to(self.dtype)
        return self._low[key]

    def _keep(self, filt, removed, f_b):
        """The suffix's keep mask for pairs of filters filt[f_b] (None when it masks no reader)."""
        if not self.lg.masked:
            return None
        return keep_mask(filt.to(f_b.device)[f_b], removed, self.lg.num_filters, f_b.device)

    def _pair_logits(self, chunk, filt, weights, removed, f_b, n_b, dtype) -> torch.Tensor:
        """Ablated logits [P, classes] of pairs (filt[f_b], n_b), the suffix in ``dtype``."""
        A, Z, B, fc = chunk.A, chunk.Z, chunk.B, self.fused
        if fc is None:
            suffix = self.suffix if dtype == torch.float32 else self._low_copy(self.suffix)
            return suffix_logits(suffix, self.lg.consumers, weights, filt, A, Z, B, f_b, n_b, self.channels_last,
                                 dtype, self._keep(filt, removed, f_b))
        R = B[fc.residual_index] if fc.residual_index is not None else None
        y_abl = fc.consumer.ablated(A[0], Z[0], R, filt.to(A[0].device)[f_b], n_b, out_dtype=dtype,
                                    backend=self.backend)
        post = fc.post if dtype == torch.float32 else self._low_copy(fc.post)
        return run_suffix(post, [y_abl], [b[n_b] for b in B], self.channels_last, dtype)

    def _exact_logits(self, chunk, filt, weights, removed, f_b, n_b) -> torch.Tensor:
        """Float32 logits of pairs by the plain suffix path (the low-precision fallback and its calibration)."""
        return suffix_logits(self.suffix, self.lg.consumers, weights, filt, chunk.A, chunk.Z, chunk.B, f_b, n_b,
                             self.channels_last, keep=self._keep(filt, removed, f_b))

    def _calibrate(self, chunk, filt, weights, removed, fi, ni) -> None:
        """Set the re-run margin from CALIBRATION_PAIRS random pairs evaluated both ways (``precision.py``)."""
        g = torch.Generator().manual_seed(0)
        pick = torch.randperm(fi.numel(), generator=g)[:CALIBRATION_PAIRS].sort().values.to(fi.device)
        f_b, n_b = fi[pick], ni[pick]
        low = self._pair_logits(chunk, filt, weights, removed, f_b, n_b, self.dtype)
        self.threshold = margin_threshold(low, self._exact_logits(chunk, filt, weights, removed, f_b, n_b))
