"""Top-1 accuracy and mean cross-entropy of a model on labelled data (eval mode, no gradients)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from carfast.batching import check_topk, eval_mode, iter_chunks, model_device
from carfast.distributed import UNSET, all_reduce_sum, process_group_argument, resolve_group
from carfast.ops.score_reduce import pair_results

__all__ = ["Evaluation", "evaluate"]


@dataclass
class Evaluation:
    """correct: images classified correctly; loss_sum: summed cross-entropy (float64); num_images."""
    correct: int
    loss_sum: float
    num_images: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.num_images

    @property
    def loss(self) -> float:
        return self.loss_sum / self.num_images


def evaluate(model: nn.Module, data, *, batch_size: int = 256, device=None, process_group=False,
             group=UNSET, topk: int = 1) -> Evaluation:
    """Evaluate ``model`` on ``data`` ((inputs [N, ...], labels [N]) or an iterable of such batches).

    The model runs in eval mode under ``torch.no_grad`` and its train/eval flags are restored. Uses the
    scoring reduction of the engine (``ops/score_reduce.py``), so the figures match ``LayerScores``.
    ``process_group``: False (default) this process's data only; None (the default process group when
    ``torch.distributed`` is initialised) or a process group: the counts of every process's data, summed.
    ``group`` is its deprecated name. ``topk``: an image counts correct when its label is among the
    ``topk`` largest logits (default 1).
    """
    check_topk(topk, "evaluate")
    group = resolve_group(process_group_argument(process_group, group, "evaluate"), "evaluate")
    device = model_device(model) if device is None else device
    correct, loss, n = 0, 0.0, 0
    with eval_mode(model), torch.no_grad():
        for x, y in iter_chunks(data, batch_size, device, "evaluate"):
            logits = model(x)
            if topk > 1:
                check_topk(topk, "evaluate", logits.shape[1])
            c, l = pair_results(logits, y, topk)
            correct += int(c.sum())
            loss += float(l.sum())
            n += y.numel()
    if group is not None:
        counts, losses = all_reduce_sum([torch.tensor([correct, n])], group, "evaluate")[0], \
            all_reduce_sum([torch.tensor([loss], dtype=torch.float64)], group, "evaluate")[0]
        correct, n, loss = int(counts[0]), int(counts[1]), float(losses[0])
    return Evaluation(correct, loss, n)
