"""``torch.nn.utils.prune`` masks for carfast's filter removals, and back.

``to_masks(model, removals)`` masks, with ``torch.nn.utils.prune.custom_from_mask``, what the physical
removal (``carfast.remove_filters``) deletes, so that the masked model computes what the pruned one
does. For every removed filter k of a layer T:

* in each consumer of T (the next Conv2d / Linear that mixes the channels), the input slice filter k
  owns is masked: a conv's input channel k (in a grouped conv, the column of k's group), or a Linear's
  block of features [k*w, (k+1)*w) after a flatten. This is what makes the outputs equal: removing a
  filter means its channel no longer reaches any consumer (design.md section 2), whatever BatchNorm,
  activation or depthwise conv lies between;
* T's own output k is masked too (its weight rows and bias entry), the usual mark of a pruned filter,
  which is how ``from_masks`` finds the removals again.

``from_masks(model)`` reads the masks back: the filters of each Conv2d / Linear whose ``weight_mask``
row (output channel) is all zero.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from ..dynamic_graph import find_consumers
from ..batching import eval_mode
from ..surgery import _example, _parse_removals

__all__ = ["to_masks", "from_masks"]

_FN = "to_masks"


def _removals_of(result_or_removals) -> Mapping:
    removed = getattr(result_or_removals, "removed", None)
    if removed is not None and not isinstance(result_or_removals, Mapping):
        return removed                                    # a PruneResult: indices of the original model
    if isinstance(result_or_removals, Mapping):
        return result_or_removals
    raise TypeError(f"{_FN}: pass a carfast.PruneResult or a dict {{layer: filters}}, got "
                    f"{type(result_or_removals).__name__}")


def _input_mask(consumer: nn.Module, filters: list[int], width: int) -> torch.Tensor:
    """A 0/1 mask of ``consumer.weight`` without the input slices the filters own."""
    w = consumer.weight
    mask = torch.ones_like(w)
    if isinstance(consumer, nn.Linear):
        for k in filters:
            mask[:, k * width:(k + 1) * width] = 0
        return mask
    in_per_group = consumer.in_channels // consumer.groups
    out_per_group = consumer.out_channels // consumer.groups
    for k in filters:
        for ci in range(k * width, (k + 1) * width):
            g = ci // in_per_group
            mask[g * out_per_group:(g + 1) * out_per_group, ci - g * in_per_group] = 0
    return mask


def _mask(module: nn.Module, param: str, mask: torch.Tensor) -> None:
    """Apply ``mask`` to ``module.<param>`` (combined with a mask already there, as torch.nn.utils.prune does)."""
    torch_prune.custom_from_mask(module, param, mask.to(getattr(module, param).device))


def to_masks(model: nn.Module, result_or_removals, *, example: torch.Tensor | None = None,
             inplace: bool = False) -> nn.Module:
    """``torch.nn.utils.prune`` masks on ``model`` (a copy unless ``inplace``) for the removed filters.

    Args:
        model: the original (unpruned) network the removals refer to.
        result_or_removals: a ``carfast.PruneResult`` (its ``removed``) or ``{layer: filters}`` with
            original filter indices, as ``carfast.remove_filters`` takes.
        example: one input [1, ...] to trace the model (default: inferred as ``remove_filters`` does).
        inplace: mask ``model`` itself instead of a deep copy.
    Returns:
        The masked model: each masked module has ``<param>_orig`` and ``<param>_mask`` as
        ``torch.nn.utils.prune`` makes them; ``torch.nn.utils.prune.remove`` makes them permanent.
        Its outputs equal the physically pruned model's (``carfast.remove_filters``) up to float rounding.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{_FN}: model must be a torch.nn.Module, got {type(model).__name__}")
    targets = _parse_removals(model, _removals_of(result_or_removals), _FN)
    work = model if inplace else copy.deepcopy(model)
    targets = {name: idx for name, idx in targets.items() if idx}
    if not targets:
        return work
    modules = dict(work.named_modules())
    with eval_mode(work), torch.no_grad():
        ex, _ = _example(work, example, _FN)
        plan = {name: find_consumers(work, name, ex, _FN) for name in targets}   # found before any mask changes the graph
    for name, filters in targets.items():
        layer = modules[name]
        rows = torch.ones_like(layer.weight)
        rows[filters] = 0
        _mask(layer, "weight", rows)
        if layer.bias is not None:
            keep = torch.ones_like(layer.bias)
            keep[filters] = 0
            _mask(layer, "bias", keep)
        for c in plan[name]:
            _mask(modules[c.name], "weight", _input_mask(modules[c.name], filters, c.width))
    return work


def from_masks(model: nn.Module) -> dict[str, list[int]]:
    """``{layer: [filters]}``: for each Conv2d / Linear with a ``weight_mask``, its all-zero output rows."""
    out = {}
    for name, m in model.named_modules():
        mask = getattr(m, "weight_mask", None)
        if isinstance(m, (nn.Conv2d, nn.Linear)) and isinstance(mask, torch.Tensor):
            dead = (mask.reshape(mask.shape[0], -1) == 0).all(1).nonzero().flatten().tolist()
            if dead:
                out[name] = dead
    return out
