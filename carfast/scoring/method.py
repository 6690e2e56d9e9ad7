"""The interface every scoring method implements, and the steps they share.

A method is one way to get the logits of the network with one filter (a group's channel) removed, for
many (filter, image) pairs, and to reduce them to CAR's counts. One module per method:

- ``suffix_eval.SuffixMethod``: the pairs through the network after the split, many per call, optionally
  in low precision with a float32 re-run of near ties;
- ``closed_form_method.ClosedFormMethod``: the consumer is followed by an elementwise epilogue and an
  affine tail; one fused op computes and reduces all pairs;
- ``full_network_method.FullNetworkMethod``: for models torch.fx cannot trace, the whole network reruns per
  filter, the naive method.

``LayerScorer`` picks one (``scorer._plan``) and talks to it only through ``ScoringMethod``:

- ``prefix(x, y) -> chunks.Chunk``: prepare a chunk of images (x [n, ...], labels y [n]): run the network up
  to where the method starts;
- ``score_chunk(chunk, filt, removed, per_image, stats, bar, *, image_loss=False, memo=None, float32=False)``
  -> (counts [F, classes] int64, loss sums [F] float64, ``chunks.ImageResults`` or None): evaluate the
  candidates ``filt`` [F] on the chunk and reduce; ``removed`` the filters gone before; ``stats`` a
  ``chunks.PairStats`` and ``bar`` a progress bar to update; ``image_loss`` adds each pair's loss to the
  per-image results; ``memo`` a dict the method may fill with the pairs' logits for the next removal
  (``logit_memo``); ``float32`` computes in float32 whatever the method's precision (exact loss sums, e.g.
  to settle ties);
- ``remove(chunk, k, removed, known=None)``: remove filter ``k`` from the chunk for good (greedy pruning;
  ``removed`` ends with ``k``; ``known`` = (logits [n, classes], seen [n] bool) the scoring kept);
- ``catch_up(chunk, removed)``: bring a chunk prepared after removals were made up to date (each removal
  in turn, unless the method can do better).
"""
from __future__ import annotations

import torch

from carfast.scoring.chunks import Chunk

__all__ = ["ScoringMethod", "prefix_chunk", "ABLATED"]

#: what a method's ablated logits are, as the non-finite error names them (``batching.check_finite``)
ABLATED = "the model's output with a filter removed"


class ScoringMethod:
    """The face of a scoring method (module docstring). ``name``: "suffix", "closed_form" or "full_network";
    ``precision``: the arithmetic of its evaluations ("fp32", "bf16", "fp16"); ``margin_threshold``: the top-k
    margin below which a low-precision pair is re-run in float32 (0 for float32 methods)."""

    name = ""
    precision = "fp32"
    margin_threshold = 0.0

    def prefix(self, x: torch.Tensor, y: torch.Tensor) -> Chunk:
        """The split network's prefix (``self.lg``, a ``LayerGraph``) run ``self.prefix_batch`` images at a time;
        a method without a split (the full network) overrides it."""
        return prefix_chunk(self.lg, x, y, self.prefix_batch)

    def score_chunk(self, chunk: Chunk, filt, removed, per_image, stats, bar, *, image_loss: bool = False, memo=None,
                    float32: bool = False):
        raise NotImplementedError

    def remove(self, chunk: Chunk, k: int, removed, known=None) -> None:
        raise NotImplementedError

    def catch_up(self, chunk: Chunk, removed) -> None:
        """Each removal in turn, as ``remove`` makes it."""
        for i, k in enumerate(removed):
            self.remove(chunk, k, removed[:i + 1])


def prefix_chunk(lg, x: torch.Tensor, y: torch.Tensor, batch: int) -> Chunk:
    """The ``Chunk`` of images ``x`` [n, ...] (labels ``y``): ``lg.prefix`` run ``batch`` images at a time."""
    parts = [lg.prefix(x[s:s + batch]) for s in range(0, x.shape[0], batch)]
    outs = [torch.cat(p) for p in zip(*parts)] if len(parts) > 1 else list(parts[0])
    u = len(lg.consumers)
    return Chunk(y, outs[-1], A=outs[:u], Z=outs[u:2 * u], B=outs[2 * u:-1])
