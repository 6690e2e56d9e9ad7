"""The closed-form and full-network methods of the engine, each as an evaluator object beside
``suffix_eval.SuffixEvaluator``: what one prepared layer needs to score a chunk of images.

- ``ClosedFormEvaluator``: the consumer is followed by an elementwise epilogue and an affine tail
  (``closed_form.py``); one fused op computes the ablated logits of all (filter, image) pairs and reduces
  them to counts (``ops/closed_form_score.py``), or, for a Linear consumer, the reference computes them
  and ``score_reduce`` counts.
- ``FullNetworkEvaluator``: for models torch.fx cannot trace, the whole network reruns per filter with
  the removal applied at the readers (``graph.apply``), the naive method, exact by construction.

Both return, per chunk, (counts [F, C] int64, loss sums [F] float64, correct [F, n] bool).
"""
from __future__ import annotations

import torch

from carfast.batching import check_finite
from carfast.graph.apply import applied
from carfast.graph.masking import keep_mask
from carfast.ops.closed_form_linear import closed_form_linear_ref
from carfast.ops.closed_form_logits import closed_form_logits
from carfast.ops.closed_form_score import closed_form_score
from carfast.ops.score_reduce import score_reduce
from carfast.scoring.pairs import active_pairs

__all__ = ["ClosedFormEvaluator", "FullNetworkEvaluator", "split_outputs"]

_WHAT = "the model's output with a filter removed"


def split_outputs(outs, consumers: int):
    """The prefix's outputs as (A, Z, B, logits): consumers' gathered inputs and outputs, boundary values."""
    return outs[:consumers], outs[consumers:2 * consumers], outs[2 * consumers:-1], outs[-1]


class ClosedFormEvaluator:
    """The closed form of one prepared layer: ``lg`` its ``LayerGraph``, ``cf`` its ``ClosedForm``,
    ``kernel`` the backend, ``fn`` the public function named in errors."""

    def __init__(self, lg, cf, kernel: str, fn: str):
        self.lg, self.cf, self.kernel, self.fn = lg, cf, kernel, fn

    def ablated(self, outs, filt) -> torch.Tensor:
        """[F, n, classes] ablated logits of ``filt`` (the torch / cpu kernels)."""
        A, Z, B, logits = split_outputs(outs, len(self.lg.consumers))
        cf = self.cf
        R = B[cf.residual_index] if cf.residual_index is not None else None
        if cf.kind == "linear":
            return closed_form_linear_ref(A[0], cf.weight, cf.width, Z[0], cf.scale, cf.shift, R, cf.act, cf.tail,
                                          logits, filt.to(logits.device))
        return closed_form_logits(A[0], cf.weight, Z[0], cf.scale, cf.shift, R, cf.act, cf.tail, logits,
                                  filt.to(logits.device), cf.stride, cf.padding, cf.dilation,
                                  backend="cpu" if self.kernel == "cpu" else "torch")

    def score_chunk(self, outs, y, filt, stats, bar):
        """(counts, loss sums, correct) of one chunk, fused with the reduction; ``stats`` [evaluated,
        skipped, re-run] updated (pairs whose filter is zero on the image count as skipped)."""
        A, Z, B, logits = split_outputs(outs, len(self.lg.consumers))
        cf = self.cf
        F_, n = len(filt), y.numel()
        if cf.kind == "conv":
            R = B[cf.residual_index] if cf.residual_index is not None else None
            counts, loss, correct = closed_form_score(A[0], cf.weight, Z[0], cf.scale, cf.shift, R, cf.act, cf.tail,
                                                      logits, filt.to(y.device), y, cf.stride, cf.padding,
                                                      cf.dilation, backend=self.kernel)
            if not bool(torch.isfinite(loss).all()):   # a non-finite logit makes its loss non-finite
                check_finite(self.ablated(outs, filt), self.fn, _WHAT)
        else:
            abl = self.ablated(outs, filt).reshape(F_ * n, -1)          # [F * n, classes]
            check_finite(abl, self.fn, _WHAT)
            slots = torch.arange(F_, device=abl.device).repeat_interleave(n)
            counts, loss, correct = score_reduce(abl, y.repeat(F_), slots, F_, backend=self.kernel)
        n_active = int(active_pairs(A, self.lg.consumers, filt).sum())
        stats[0] += n_active
        stats[1] += F_ * n - n_active
        bar.update(F_ * n)
        return counts, loss.sum(1), correct.view(F_, n)


class FullNetworkEvaluator:
    """The whole model rerun per filter: ``model`` (the scorer's copy), ``flow`` (recorded front end),
    ``pair_batch`` images per run, ``kernel`` the backend of ``score_reduce``."""

    def __init__(self, model, flow, pair_batch: int, kernel: str, fn: str):
        self.model, self.flow, self.pair_batch, self.kernel, self.fn = model, flow, pair_batch, kernel, fn

    def run_removed(self, x, units) -> torch.Tensor:
        """Logits [n, classes] of the whole model with ``units`` removed."""
        keep = keep_mask(None, units, self.flow.num_units, x.device)
        with applied(self.model, self.flow, keep):
            return torch.cat([self.model(x[s:s + self.pair_batch]) for s in range(0, x.shape[0], self.pair_batch)])

    def score_chunk(self, x, y, filt, removed, num_classes: int, stats, bar):
        """(counts, loss sums, correct) of one chunk of images ``x``: one rerun per filter, with ``removed``."""
        counts = torch.zeros(len(filt), num_classes, dtype=torch.long, device=y.device)
        loss = torch.zeros(len(filt), dtype=torch.float64, device=y.device)
        correct = torch.zeros(len(filt), y.numel(), dtype=torch.bool, device=y.device)
        slots = torch.zeros_like(y)
        for f, k in enumerate(filt.tolist()):
            abl = self.run_removed(x, list(removed) + [k])
            check_finite(abl, self.fn, _WHAT)
            c, l, correct[f] = score_reduce(abl, y, slots, 1, backend=self.kernel)
            counts[f], loss[f] = c[0], l.sum()
            bar.update(x.shape[0])
        stats[0] += x.shape[0] * len(filt)
        return counts, loss, correct
