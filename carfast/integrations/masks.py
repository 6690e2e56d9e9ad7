"""``torch.nn.utils.prune`` masks for carfast's filter removals, and back.

``to_masks(model, removals)`` masks, with ``torch.nn.utils.prune.custom_from_mask``, what the physical
removal (``carfast.remove_filters``, or ``carfast.remove_groups`` for a layer whose channels are coupled
with other layers') deletes, so that the masked model computes what the pruned one does. It reads the
same channel-flow analysis (``carfast.graph``). For every removed unit:

* in each reader (a Conv2d / Linear reading the channel), the input it owns is masked: a conv's input
  channel (in a grouped conv, the column of its group), or a Linear's features (after a flatten, the
  block the channel owns). This is what makes the outputs equal: removing a filter means its channel
  no longer reaches any reader, whatever BatchNorm, activation or depthwise conv lies between;
* each producer's output rows (and bias entries) are masked too, the usual mark of a pruned filter,
  which is how ``from_masks`` finds the removals again.

What weight masks cannot express is refused with the reason: a normaliser (LayerNorm, GroupNorm(1))
renormalises over the channels that remain, and a parameter-free channel-map shortcut has no weights.

``from_masks(model)`` reads the masks back: the filters of each Conv2d / Linear whose ``weight_mask``
row (output channel) is all zero.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from carfast.batching import eval_mode
from carfast.graph import analyze_units, build_graph
from carfast.graph.example import infer_example
from carfast.graph.registry import defines, layer_filters, user_handler
from carfast.surgery.remove import parse_removals

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


def _input_mask(w: torch.Tensor, kind: str, groups: int, inputs: list[int]) -> torch.Tensor:
    """A 0/1 mask of a reader's weight without input channels / features ``inputs``."""
    mask = torch.ones_like(w)
    if kind == "linear":
        mask[:, inputs] = 0
        return mask
    in_per_group = w.shape[1]
    out_per_group = w.shape[0] // groups
    for ci in inputs:
        g = ci // in_per_group
        mask[g * out_per_group:(g + 1) * out_per_group, ci - g * in_per_group] = 0
    return mask


def _mask(module: nn.Module, param: str, mask: torch.Tensor) -> None:
    """Apply ``mask`` to ``module.<param>`` (combined with a mask already there, as torch.nn.utils.prune does)."""
    torch_prune.custom_from_mask(module, param, mask.to(getattr(module, param).device))


def _registered_masks(op, fn: str, ins=(), outs=()) -> bool:
    """Mask a registered type by its handler's ``masks`` (True), or False for any other op."""
    if op.kind != "module" or (handler := user_handler(op.target)) is None:
        return False
    masks = handler.masks(op.target, sorted(ins), sorted(outs)) if defines(handler, "masks") else None
    if masks is None:
        raise ValueError(f"{fn}: the removal reaches {op.label} ({type(op.target).__name__}), whose handler gives "
                         "no weight masks (ModuleHandler.masks); use carfast.remove_filters / remove_groups")
    for attr, mask in masks.items():
        _mask(op.target, attr, mask)
    return True


def _weight_owner(op, modules) -> tuple[nn.Module, str]:
    if op.kind == "module":
        return op.target, "weight"
    w = op.args[1] if len(op.args) > 1 else op.kwargs.get("weight")
    if getattr(w, "kind", None) != "param":
        raise ValueError(f"{_FN}: {op.label}'s weight is computed in forward; weight masks cannot reach it")
    return modules[w.module], w.target


def to_masks(model: nn.Module, result_or_removals, *, example: torch.Tensor | None = None,
             inplace: bool = False) -> nn.Module:
    """``torch.nn.utils.prune`` masks on ``model`` (a copy unless ``inplace``) for the removed filters.

    Args:
        model: the original (unpruned) network the removals refer to.
        result_or_removals: a ``carfast.PruneResult`` (its ``removed``) or ``{layer: filters}`` with
            original filter indices, as ``carfast.remove_filters`` takes (a layer coupled with others:
            channels of its group, as ``carfast.remove_groups`` takes).
        example: one input [1, ...] to trace the model (default: inferred as ``remove_filters`` does).
        inplace: mask ``model`` itself instead of a deep copy.
    Returns:
        The masked model: each masked module has ``<param>_orig`` and ``<param>_mask`` as
        ``torch.nn.utils.prune`` makes them; ``torch.nn.utils.prune.remove`` makes them permanent.
        Its outputs equal the physically pruned model's up to float rounding.
    Raises:
        ValueError for what ``remove_filters`` refuses, and where weight masks cannot express the removal
        (a normaliser or a channel-map shortcut reads the channels).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{_FN}: model must be a torch.nn.Module, got {type(model).__name__}")
    targets = parse_removals(model, _removals_of(result_or_removals), _FN)
    work = model if inplace else copy.deepcopy(model)
    targets = {name: idx for name, idx in targets.items() if idx}
    if not targets:
        return work
    modules = dict(work.named_modules())
    plan = []
    with eval_mode(work), torch.no_grad():
        ex, _ = infer_example(work, example, _FN)
        graph = build_graph(work, ex)
        for name, filters in targets.items():    # every flow found before any mask changes the graph
            flow, group = analyze_units(work, name, ex, _FN, graph=graph)
            units = sorted(set(filters)) if group else sorted({int(flow.unit_of[k]) for k in filters})
            if group and (units[-1] >= flow.num_units or len(units) == flow.num_units):
                raise ValueError(f"{_FN}: the coupling group of {name!r} has {flow.num_units} channels; give between "
                                 f"1 and {flow.num_units - 1} of its channel indices (0..{flow.num_units - 1})")
            for r in flow.readers:
                if r.kind in ("norm", "channel_map"):
                    what = "a normaliser, which renormalises over the channels that remain" if r.kind == "norm" \
                        else "a parameter-free channel-map shortcut, which has no weights"
                    raise ValueError(f"{_FN}: removing filters of {name!r} reaches {r.op.label}, {what}; weight "
                                     "masks cannot express that: use carfast.remove_filters / remove_groups")
            plan.append((flow, units))
    for flow, units in plan:
        for p in flow.producers:
            if p.kind == "channel_map":
                raise ValueError(f"{_FN}: the group of {flow.layer!r} is fed by {p.op.label}, a parameter-free "
                                 "channel-map shortcut, which weight masks cannot reach: use carfast.remove_groups")
            rows = [int(i) for u in units for i in p.rows[u].tolist()]
            if _registered_masks(p.op, _FN, outs=rows):
                continue
            module, attr = _weight_owner(p.op, modules)
            keep = torch.ones_like(getattr(module, attr))
            keep[rows] = 0
            _mask(module, attr, keep)
            if getattr(module, "bias", None) is not None and p.op.kind == "module":
                b = torch.ones_like(module.bias)
                b[rows] = 0
                _mask(module, "bias", b)
        for r in flow.readers:
            inputs = [int(i) for u in units for i in r.owned[u].tolist()]
            if _registered_masks(r.op, _FN, ins=inputs):
                continue
            module, attr = _weight_owner(r.op, modules)
            groups = getattr(module, "groups", 1) if r.kind == "conv" else 1
            _mask(module, attr, _input_mask(getattr(module, attr), r.kind, groups, inputs))
    return work


def from_masks(model: nn.Module) -> dict[str, list[int]]:
    """``{layer: [filters]}``: for each Conv2d / Linear (or registered layer type) with a ``weight_mask``
    [filters, ...], its all-zero output rows."""
    out = {}
    for name, m in model.named_modules():
        mask = getattr(m, "weight_mask", None)
        if layer_filters(m) is not None and isinstance(mask, torch.Tensor):
            dead = (mask.reshape(mask.shape[0], -1) == 0).all(1).nonzero().flatten().tolist()
            if dead:
                out[name] = dead
    return out
