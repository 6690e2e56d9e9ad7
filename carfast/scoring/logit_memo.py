"""The ablated logits a greedy step's scoring computed, kept for the removal the step then makes.

Greedy pruning scores the candidates, removes the best one, and the removal needs the network's logits
with that filter gone on every cached image (``Chunk.set_logits``): the very logits the scoring computed
for it. Without them a removal costs one more pass of the suffix over every image, 1/K of an exact step
of K candidates and a much larger share of a raced one, which scores few candidates on every image.

``LogitMemo`` keeps, per cached chunk and scored filter, the float32 ablated logits of the (filter, image)
pairs evaluated since the last removal, up to ``budget`` bytes (filters that would exceed it are not
kept). A removal then runs the pass only over the images whose logits were neither kept nor unchanged:
an image where the filter is all zero at the consumers keeps its logits with or without the memo
(``SuffixMethod.remove``), so a removal made from the memo and one replayed without it (resuming a
checkpoint) leave the same cache. The suffix method keeps logits only where its scoring runs the float32
suffix on the cached tensors as the pass does (tests/test_logit_memo.py checks that removals from the memo
and from the pass agree). Every removal clears the memo: the logits belong to the state they were scored
on.
"""
from __future__ import annotations

import torch

__all__ = ["LogitMemo", "MEMO_BYTES"]

MEMO_BYTES = 64 << 20      # default budget: the ablated logits of, e.g., 64 filters x 25,000 images x 10 classes


class LogitMemo:
    """{(chunk index, filter): (logits [n, classes] float32, seen [n] bool)} for one scorer's cached chunks."""

    def __init__(self, budget: int = MEMO_BYTES):
        self.budget = budget
        self.clear()

    def clear(self) -> None:
        self._kept: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.bytes = 0

    def room(self, chunk: int, filters: list[int], num_images: int, num_classes: int) -> bool:
        """Whether the filters not yet kept for cached chunk ``chunk`` (of ``num_images`` images) fit."""
        new = sum((chunk, f) not in self._kept for f in filters)
        return self.bytes + new * num_images * num_classes * 4 <= self.budget

    def add(self, chunk: int, num_images: int, filters: list[int], positions, logits: torch.Tensor,
            evaluated: torch.Tensor) -> None:
        """Keep ``logits`` [F, m, classes] of ``filters`` on images ``positions`` ([m] int64 of the cached
        chunk's ``num_images``; None: all of them, in order) where ``evaluated`` [F, m] bool."""
        at = torch.arange(num_images, device=logits.device) if positions is None else positions.to(logits.device)
        for f, rows, done in zip(filters, logits, evaluated):
            key = (chunk, f)
            if key not in self._kept:
                self._kept[key] = (torch.empty(num_images, rows.shape[-1], dtype=torch.float32, device=rows.device),
                                   torch.zeros(num_images, dtype=torch.bool, device=rows.device))
                self.bytes += num_images * rows.shape[-1] * 4
            kept, seen = self._kept[key]
            kept[at[done]] = rows[done]
            seen[at[done]] = True

    def take(self, chunk: int, f: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(logits [n, classes], seen [n] bool) of filter ``f`` removed, on cached chunk ``chunk``'s images
        (valid where ``seen``), or None when none were kept."""
        return self._kept.get((chunk, f))
