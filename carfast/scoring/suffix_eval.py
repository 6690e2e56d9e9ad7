"""Evaluating (filter, image) pairs through the suffix, many per call, optionally in low precision.

``SuffixEvaluator`` holds what one layer's suffix needs across ``score`` calls: the optimised suffix
(or, with the fused consumer of ``fused_suffix.py``, the ``ablated_consumer`` op and the network after
the consumer's epilogue), its low-precision copies, and the calibrated re-run margin of
``precision.py``. Per chunk of images it evaluates only the active pairs (the filter is not all zero
on the image), in batches, and reduces each batch's logits to per-(filter, class) counts and loss sums
(``ops/score_reduce.py``); the inactive pairs take the intact result (``pairs.intact_counts``).
"""
from __future__ import annotations

import copy

import torch

from carfast.graph.masking import keep_mask
from carfast.ops.ablated_consumer import ablated_consumer
from carfast.scoring.pairs import active_pairs, intact_counts, reduce_pair_batch, run_suffix, suffix_logits
from carfast.scoring.precision import CALIBRATION_PAIRS, margin_threshold, top1_margin

__all__ = ["SuffixEvaluator"]

_FN = "score_layer"


class SuffixEvaluator:
    """The suffix method of one prepared layer (see the module docstring).

    lg: the ``LayerGraph``; suffix: its optimised float32 suffix (Z, B) -> logits; fused: a
    ``FusedConsumer`` or None; channels_last: the suffix's layout; dtype: the suffix's arithmetic
    (float32, bfloat16 or float16); kernel: the backend of the ops; pair_batch: pairs per call.
    ``threshold`` is the re-run margin, set on the first chunk scored in low precision.
    """

    def __init__(self, lg, suffix, fused, channels_last: bool, dtype: torch.dtype, kernel: str, pair_batch: int,
                 removed: list):
        self.lg, self.suffix, self.fused, self.removed = lg, suffix, fused, removed
        self.channels_last, self.dtype, self.kernel, self.pair_batch = channels_last, dtype, kernel, pair_batch
        self.threshold: float | None = None
        self._low = {}   # low-precision copies of the suffix (or of fused.post), made on first use

    def score_chunk(self, A, Z, B, y, num_classes: int, base_correct, base_loss, filt, weights, per_image, stats,
                    bar):
        """(counts [F, C], loss sums [F], correct [F, n] or None) of one chunk of images.

        A, Z: each consumer's cached input and output; B: the boundary values; y [n] labels of
        ``num_classes`` classes;
        base_correct [n] bool, base_loss [n] float64: the intact results; filt [F] filter indices;
        weights[u][f]: consumer u's weight restricted to filter f's inputs; stats: [evaluated, skipped,
        re-run in float32] counters, updated; bar: the progress bar.
        """
        F_, C = len(filt), num_classes
        if self.lg.masked:   # readers inside the suffix: a filter zero at the consumers may still matter there
            active = torch.ones(F_, y.numel(), dtype=torch.bool, device=y.device)
        else:
            active = active_pairs(A, self.lg.consumers, filt)
        fi, ni = active.nonzero(as_tuple=True)
        low = self.dtype != torch.float32
        if low and self.threshold is None and fi.numel():
            self._calibrate(A, Z, B, filt, weights, fi, ni)
        counts = torch.zeros(F_, C, dtype=torch.long, device=y.device)
        loss = torch.zeros(F_, dtype=torch.float64, device=y.device)
        img_correct = base_correct.expand(F_, -1).clone() if per_image else None
        for s in range(0, fi.numel(), self.pair_batch):
            f_b, n_b = fi[s:s + self.pair_batch], ni[s:s + self.pair_batch]
            abl = self._pair_logits(A, Z, B, filt, weights, f_b, n_b, self.dtype)
            if low:
                redo = (top1_margin(abl) <= self.threshold).nonzero().flatten()
                abl = abl.float()
                if redo.numel():
                    abl[redo] = self._exact_logits(A, Z, B, filt, weights, f_b[redo], n_b[redo])
                stats[2] += redo.numel()
            reduce_pair_batch(abl, y[n_b], f_b, n_b, counts, loss, img_correct, self.kernel, _FN,
                              "the model's output with a filter removed")
            bar.update(f_b.numel())
        c, l = intact_counts(~active, base_correct, base_loss, y, C)
        total = F_ * y.numel()
        stats[0] += fi.numel()
        stats[1] += total - fi.numel()
        bar.update(total - fi.numel())
        return counts + c, loss + l, img_correct

    def _low_copy(self, module):
        """``module`` in ``self.dtype`` (made once)."""
        key = id(module)
        if key not in self._low:
            self._low[key] = copy.deepcopy(module).to(self.dtype)
        return self._low[key]

    def _keep(self, filt, f_b):
        """The suffix's keep mask for pairs of filters filt[f_b] (None when it masks no reader)."""
        if not self.lg.masked:
            return None
        return keep_mask(filt.to(f_b.device)[f_b], self.removed, self.lg.num_filters, f_b.device)

    def _pair_logits(self, A, Z, B, filt, weights, f_b, n_b, dtype) -> torch.Tensor:
        """Ablated logits [P, classes] of pairs (filt[f_b], n_b), the suffix in ``dtype``."""
        fc = self.fused
        if fc is None:
            suffix = self.suffix if dtype == torch.float32 else self._low_copy(self.suffix)
            return suffix_logits(suffix, self.lg.consumers, weights, filt, A, Z, B, f_b, n_b, self.channels_last,
                                 dtype, self._keep(filt, f_b))
        R = B[fc.residual_index] if fc.residual_index is not None else None
        y_abl = ablated_consumer(A[0], fc.weight, Z[0], fc.scale, fc.shift, R, fc.act, filt.to(A[0].device)[f_b],
                                 n_b, fc.stride, fc.padding, fc.dilation, out_dtype=dtype, backend=self.kernel)
        post = fc.post if dtype == torch.float32 else self._low_copy(fc.post)
        return run_suffix(post, [y_abl], [b[n_b] for b in B], self.channels_last, dtype)

    def _exact_logits(self, A, Z, B, filt, weights, f_b, n_b) -> torch.Tensor:
        """Float32 logits of pairs by the plain suffix path (the low-precision fallback and its calibration)."""
        return suffix_logits(self.suffix, self.lg.consumers, weights, filt, A, Z, B, f_b, n_b, self.channels_last,
                             keep=self._keep(filt, f_b))

    def _calibrate(self, A, Z, B, filt, weights, fi, ni) -> None:
        """Set the re-run margin from CALIBRATION_PAIRS random pairs evaluated both ways (``precision.py``)."""
        g = torch.Generator().manual_seed(0)
        pick = torch.randperm(fi.numel(), generator=g)[:CALIBRATION_PAIRS].sort().values.to(fi.device)
        f_b, n_b = fi[pick], ni[pick]
        low = self._pair_logits(A, Z, B, filt, weights, f_b, n_b, self.dtype)
        self.threshold = margin_threshold(low, self._exact_logits(A, Z, B, filt, weights, f_b, n_b))
