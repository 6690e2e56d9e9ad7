"""CAR as a Torch-Pruning importance: ``CARImportance`` (``pip install carfast[torch-pruning]``).

Torch-Pruning (``torch_pruning``) finds the channels that must be removed together (its dependency
*groups*) and asks an importance criterion for one score per channel of each group. ``CARImportance``
answers with carfast's CAR: the accuracy the network loses when the channel is removed from the whole
group, on the data it was given, with ties in accuracy broken by the loss increase. A group with one
conv or linear producer is scored by ``carfast.score_layer``, a residual group by
``carfast.score_group``; the model scored is the one Torch-Pruning is pruning, as it is at that step.

The CIFAR ResNets' parameter-free padding shortcut (``carfast.models.OptionAShortcut``) needs a pruner
of its own in Torch-Pruning: without one, Torch-Pruning takes the padding for an element-wise op and
merges all three stages into one group with mismatched channel indices. ``channel_map_pruners(model)``
gives the ``customized_pruners`` that make Torch-Pruning's groups carfast's (one per stage)::

    import torch_pruning as tp
    from carfast.integrations.torch_pruning import CARImportance, channel_map_pruners
    pruner = tp.pruner.BasePruner(model, example, CARImportance((x, y)), pruning_ratio=0.3,
                                  iterative_steps=2, ignored_layers=[model.linear],
                                  customized_pruners=channel_map_pruners(model))
    for _ in range(2):
        pruner.step()
"""
from __future__ import annotations

import math

import torch
from torch import nn

from carfast.graph import is_channel_map
from carfast.scoring.group_scorer import score_group
from carfast.scoring.scorer import score_layer
from carfast.surgery.slicers import remap_channel_map

try:
    import torch_pruning as tp
except ImportError as err:   # the rest of carfast works without it
    raise ImportError("carfast.integrations.torch_pruning needs Torch-Pruning: pip install 'carfast[torch-pruning]' "
                      "(or pip install torch-pruning)") from err

__all__ = ["CARImportance", "ChannelMapPruner", "channel_map_pruners", "car_importance"]

_FN = "CARImportance"
_OPTIONS = {"device", "batch_size", "memory_budget", "backend", "precision", "progress", "process_group", "options"}


def car_importance(scores, rank_by: str = "accuracy") -> torch.Tensor:
    """[F] float64 importance of ``LayerScores``, higher = more important, comparable across layers scored
    on the same images.

    rank_by "accuracy": the accuracy drop (``scores.car``) plus a tie-break below one image,
    0.5 + atan(loss increase) / pi over N, so an accuracy tie goes to the larger loss increase;
    "loss": the mean loss increase alone (smoother on few images, see benchmarks/RESULTS.md).
    """
    if rank_by == "loss":
        return scores.loss_increase.double()
    n = scores.num_images
    drop = (scores.base_correct.sum() - scores.correct.sum(1)).double()        # images lost, an integer
    tie = 0.5 + torch.atan(scores.loss_increase) / math.pi                     # in (0, 1)
    return (drop + tie) / n


class CARImportance(tp.importance.Importance):
    """A ``torch_pruning`` importance: CAR of each channel of a group (see the module docstring).

    Args:
        data: ``(inputs, labels)`` or an iterable of batches, as for ``score_layer``.
        rank_by: "accuracy" (default: the accuracy drop, ties broken by the loss increase) or "loss"
            (the loss increase alone); see ``car_importance``.
        **score_options: passed to ``score_layer`` / ``score_group`` (device, batch_size, memory_budget,
            backend, precision, progress, group, options).
    ``last_scores`` holds the ``LayerScores`` of the last group scored (``members`` says what carfast found).
    """

    def __init__(self, data, rank_by: str = "accuracy", **score_options):
        if rank_by not in ("accuracy", "loss"):
            raise ValueError(f"{_FN}: rank_by must be 'accuracy' (the accuracy drop, ties broken by the loss "
                             f"increase) or 'loss' (the loss increase), got {rank_by!r}")
        self.rank_by = rank_by
        unknown = set(score_options) - _OPTIONS
        if unknown:
            raise TypeError(f"{_FN}: unknown score options {sorted(unknown)}; accepted: {sorted(_OPTIONS)}")
        self.data = data
        self.options = {"progress": False, **score_options}
        self.last_scores = None

    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor:
        DG = group._DG
        model = DG.model
        names = {m: n for n, m in model.named_modules()}
        root, idxs = group[0].dep.target.module, [int(i) for i in group[0].idxs]
        if not DG.is_out_channel_pruning_fn(group[0].dep.handler) or not isinstance(root, (nn.Conv2d, nn.Linear)):
            raise ValueError(f"{_FN}: the group's root {type(root).__name__} is not a Conv2d / Linear losing output "
                             "channels; carfast scores output channels (use root_module_types=[nn.Conv2d, nn.Linear])")
        producers = sorted({names[dep.target.module] for dep, _ in group
                            if DG.is_out_channel_pruning_fn(dep.handler)
                            and isinstance(dep.target.module, (nn.Conv2d, nn.Linear))})
        layer = names[root]
        if len(producers) == 1:
            scores = score_layer(model, layer, self.data, **self.options)
        else:
            scores = score_group(model, layer, self.data, **self.options)
            found = sorted(m["layer"] for m in scores.members if m["role"] == "output")
            if found != producers:
                raise ValueError(f"{_FN}: Torch-Pruning's group of {layer!r} has producers {producers}, carfast's "
                                 f"{found}; for channel-padding shortcuts pass customized_pruners="
                                 "channel_map_pruners(model) to the pruner")
        self.last_scores = scores
        return car_importance(scores, self.rank_by)[idxs].float()


class ChannelMapPruner(tp.pruner.BasePruningFunc):
    """Torch-Pruning pruner of a channel-map shortcut (``models.OptionAShortcut``): removing input or output
    channels edits its map, so its input and output channels belong to different groups."""

    def prune_out_channels(self, layer: nn.Module, idxs) -> nn.Module:
        remap_channel_map(layer, set(), {int(i) for i in idxs})
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs) -> nn.Module:
        remap_channel_map(layer, {int(i) for i in idxs}, set())
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.carfast_channel_map()[1]

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.carfast_channel_map()[0]


def channel_map_pruners(model: nn.Module) -> dict:
    """``customized_pruners`` for Torch-Pruning: a ``ChannelMapPruner`` for each channel-map shortcut class
    in ``model`` (``{OptionAShortcut: ChannelMapPruner()}`` for the CIFAR ResNets; empty when none)."""
    return {type(m): ChannelMapPruner() for m in model.modules() if is_channel_map(m)}
