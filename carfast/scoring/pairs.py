"""Evaluating (filter, image) ablation pairs and accumulating their results into counts."""
from __future__ import annotations

import torch

from carfast.batching import check_finite
from carfast.distributed import all_reduce_sum
from carfast.ops.consumer_delta import consumer_delta
from carfast.ops.score_reduce import score_reduce
from carfast.scoring.scores import LayerScores

__all__ = ["Accumulator", "reduce_pair_batch", "active_pairs", "intact_counts", "suffix_logits", "suffix_base_logits",
           "run_suffix"]


class Accumulator:
    """Integer counts and float64 loss sums over chunks of images; optional per-image results."""

    def __init__(self, num_filters: int, per_image: bool):
        self.F, self.per_image = num_filters, per_image
        self.C = None
        self.n = 0
        self.image_correct, self.base_image_correct, self.image_loss = [], [], []

    def add(self, y, base_correct, base_loss, correct, loss_sum, images, num_classes: int):
        """One chunk: y [n]; base_correct [n] bool; base_loss [n] f64; correct [F, C] int64 (per filter and
        label class); loss_sum [F] f64; images: ``chunks.ImageResults`` (or None unless per_image)."""
        if self.C is None:
            dev, self.C = y.device, num_classes
            self.class_totals = torch.zeros(num_classes, dtype=torch.long, device=dev)
            self.base_correct = torch.zeros(num_classes, dtype=torch.long, device=dev)
            self.correct = torch.zeros(self.F, num_classes, dtype=torch.long, device=dev)
            self.base_loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
            self.loss_sum = torch.zeros(self.F, dtype=torch.float64, device=dev)
        self.n += y.numel()
        self.class_totals += torch.bincount(y, minlength=self.C)
        self.base_correct.index_add_(0, y, base_correct.long())
        self.correct += correct
        self.base_loss_sum += base_loss.sum()
        self.loss_sum += loss_sum
        if self.per_image:
            self.image_correct.append(images.correct.cpu())
            self.base_image_correct.append(base_correct.cpu())
            if images.loss is not None:
                self.image_loss.append(images.loss.cpu())

    def all_reduce(self, group, stats: list[int], fn: str) -> list[int]:
        """Sum the counts, loss sums and ``stats`` over ``group``'s processes (``distributed.py``), in place;
        returns the summed stats. Every process must have scored at least one image."""
        ints = [torch.tensor([self.n] + list(stats), device=self.correct.device), self.class_totals,
                self.base_correct, self.correct]
        n_stats, self.class_totals, self.base_correct, self.correct = all_reduce_sum(ints, group, fn)
        self.n = int(n_stats[0])
        self.base_loss_sum, self.loss_sum = all_reduce_sum([self.base_loss_sum.reshape(1), self.loss_sum], group, fn)
        self.base_loss_sum = self.base_loss_sum[0]
        return [int(v) for v in n_stats[1:]]

    def result(self, name, filters, **info) -> LayerScores:
        return LayerScores(
            layer=name, filters=filters.cpu(), num_images=self.n, class_totals=self.class_totals.cpu(),
            base_correct=self.base_correct.cpu(), correct=self.correct.cpu(),
            base_loss_sum=float(self.base_loss_sum), loss_sum=self.loss_sum.cpu(),
            image_correct=torch.cat(self.image_correct, 1) if self.per_image else None,
            base_image_correct=torch.cat(self.base_image_correct) if self.per_image else None,
            image_loss=torch.cat(self.image_loss, 1) if self.image_loss else None, **info)


def reduce_pair_batch(abl, y_b, f_b, n_b, counts, loss, images, backend: str, fn: str, what: str,
                      topk: int = 1) -> None:
    """Add one batch of pairs to the running results, in place.

    abl [P, classes] ablated logits of pairs (slot f_b[p], image n_b[p]); y_b [P] their labels; counts
    [F, C] int64 and loss [F] float64 running sums; images: ``chunks.ImageResults`` or None; ``backend``
    of ``score_reduce``; ``fn`` / ``what`` name the caller and the logits in the non-finite error;
    ``topk``: correct means the label is among the top-k logits.
    """
    check_finite(abl, fn, what)
    c, l, corr = score_reduce(abl, y_b, f_b, counts.shape[0], backend=backend, topk=topk)
    counts += c
    loss += l.sum(1)
    if images is not None:
        images.set(f_b, n_b, corr, abl, y_b)


def active_pairs(A, consumers, filt) -> torch.Tensor:
    """[F, n] bool: does filter f have any nonzero value in what it owns of any consumer's input on image n?

    A: the consumers' gathered inputs, each [n, L, ...] (``graph.Consumer``). A pair that is False equals
    the intact result.
    """
    active = None
    for a, c in zip(A, consumers):
        n = a.shape[0]
        per_pos = a.movedim(c.axis, 1).reshape(n, a.shape[c.axis], -1).ne(0).any(2)     # [n, L]
        unit = torch.repeat_interleave(torch.arange(len(c.offsets) - 1, device=a.device), c.offsets.diff().to(a.device))
        nz = torch.zeros(n, len(c.offsets) - 1, device=a.device).index_add_(1, unit, per_pos.float()) > 0
        nz = nz[:, filt.to(a.device)].t()
        active = nz if active is None else active | nz
    return active


def intact_counts(inactive, base_correct, base_loss, y, num_classes: int):
    """Counts [F, C] int64 and loss sums [F] float64 of the pairs that take the intact result.

    inactive [F, n] bool (the filter is all zero on the image); base_correct [n] bool; base_loss [n]
    float64; y [n]. Exact: 0/1 products summed in float64 (integers below 2**53).
    """
    onehot = torch.nn.functional.one_hot(y, num_classes).double()                   # [n, C]
    m = inactive.double()
    counts = (m * base_correct.double()) @ onehot
    return counts.round().long(), m @ base_loss


def suffix_logits(suffix, consumers, weights, filt, A, Z, B, f_b, n_b, channels_last: bool,
                  dtype: torch.dtype = torch.float32, keep=None) -> torch.Tensor:
    """Ablated logits [P, classes] for the pairs (filter ``filt[f_b[p]]``, image ``n_b[p]``); f_b sorted.

    A, Z: each consumer's gathered input [n, L, ...] and output [n, O, ...]; B: boundary values [n, ...];
    weights[u][f]: consumer u's weight restricted to filter f's owned inputs; keep: the suffix's keep mask
    [P, U + 1] when it masks readers (``masking.keep_mask``), else None. The consumer deltas are float32;
    the suffix (whose parameters must be in ``dtype``) runs on inputs cast to ``dtype``.
    """
    runs, counts = torch.unique_consecutive(f_b, return_counts=True)
    zs = []
    for ui, (a, z, c) in enumerate(zip(A, Z, consumers)):
        zp = z[n_b]
        off = 0
        for f, cnt in zip(runs.tolist(), counts.tolist()):
            s, e = c.owned(int(filt[f]))
            if e > s:
                owned = a[n_b[off:off + cnt]].narrow(c.axis, s, e - s)
                zp[off:off + cnt] -= consumer_delta(c.spec, owned, weights[ui][f])
            off += cnt
        zs.append(zp)
    return run_suffix(suffix, zs, [b[n_b] for b in B], channels_last, dtype, keep)


def suffix_base_logits(suffix, Z, B, batch: int, channels_last: bool, keep=None) -> torch.Tensor:
    """Logits [n, classes] of the suffix on the consumers' outputs Z and boundary values B as they are
    (after a filter removal has updated Z), ``batch`` images per call; ``keep`` [1, U + 1] the removals
    for a suffix that masks readers."""
    n = Z[0].shape[0] if Z else B[0].shape[0]
    # copies: a suffix may compute in place (a ReLU(inplace=True) right after the consumer), and Z and B
    # are the cache the next removals update
    return torch.cat([run_suffix(suffix, [z[s:s + batch].clone() for z in Z], [b[s:s + batch].clone() for b in B],
                                 channels_last, keep=keep) for s in range(0, n, batch)])


def run_suffix(suffix, zs, bs, channels_last: bool, dtype: torch.dtype = torch.float32, keep=None) -> torch.Tensor:
    """``suffix(*zs, *bs[, keep])`` with the inputs in the suffix's layout and, when floating, in ``dtype``."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def prep(t):
        t = t.to(dtype) if t.is_floating_point() else t
        return t.contiguous(memory_format=fmt) if t.dim() == 4 else t
    extra = () if keep is None else (keep,)
    return suffix(*[prep(z) for z in zs], *[prep(b) for b in bs], *extra)
