"""Physically remove channels of coupling groups: ``remove_groups``.

Removing channel i of a group (``groups.py``) deletes output i of every producer (Conv2d rows and
bias, Linear rows), entry i of every BatchNorm on the residual stream, input i of every reader (the
Conv2d input channel, or the block of a Linear's features after a flatten) and, in a channel-map
shortcut (``models.OptionAShortcut``), the input or output slot the channel occupies. The smaller
network computes what the network with channel i zeroed on the whole stream computes, up to float
rounding; ``score_group`` scores exactly that removal.
"""
from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Mapping

import torch
from torch import nn

from . import graph
from .batching import eval_mode
from .groups import find_group
from .ops_catalog import is_channel_map
from .surgery import _example, _expand, _parse_removals, _plan, add_edit, apply_edits

__all__ = ["remove_groups"]

_FN = "remove_groups"


def remove_groups(model: nn.Module, removals: Mapping, *, example: torch.Tensor | None = None) -> nn.Module:
    """A physically smaller deep copy of ``model`` without the given channels of coupling groups.

    Args:
        model: the network; not changed.
        removals: ``{layer: channels}``; ``layer`` names any producer of a coupling group (the stem conv,
            a block's second conv; see ``score_group``), ``channels`` distinct indices of the group's
            channels (its output channels). A layer whose channels enter no residual add is removed as by
            ``remove_filters``. Two producers of one group may not both be listed.
        example: one input [1, ...] (inferred as ``remove_filters`` does when None).
    Returns:
        The pruned copy.
    Raises:
        ValueError for bad indices, removing every channel of a group, a group member listed twice, a
        channel-padding shortcut written as a function (``F.pad``; surgery needs a module with
        ``carfast_channel_map()`` / ``set_channel_map()`` such as ``carfast.models.OptionAShortcut``),
        or anything ``remove_filters`` refuses.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{_FN}: model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(removals, Mapping):
        raise TypeError(f"{_FN}: removals must be a dict {{layer: channel indices}}, got {type(removals).__name__}")
    targets = {name: idx for name, idx in _parse_removals(model, removals, _FN).items() if idx}
    work = copy.deepcopy(model)
    if not targets:
        return work
    with eval_mode(work), torch.no_grad():
        ex, out_sig = _example(work, example, _FN)
        gm = graph.trace(work, ex)
        calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
        edits: dict[str, tuple[set, set, list]] = {}
        plain, owner = {}, {}
        for name, channels in targets.items():
            try:
                cg = find_group(gm, name, _FN)
            except ValueError as err:    # e.g. a depthwise conv after the layer: fine if it is not coupled
                try:
                    _plan(work, {name: channels}, ex)
                except ValueError:
                    raise err from None
                plain[name] = channels
                continue
            if not cg.coupled:
                plain[name] = channels
                continue
            for p in cg.producers:
                if p in owner:
                    raise ValueError(f"{_FN}: {owner[p]!r} and {name!r} are in one coupling group; list the group "
                                     "once, by one of its layers")
                owner[p] = name
            _group_edits(cg, channels, edits)
        if plain:
            for k, (ins, outs, by) in _plan(work, plain, ex)[0].items():
                add_edit(edits, k, ins, outs, by)
        apply_edits(work, edits, calls, ex, out_sig, _FN)
    return work


def _group_edits(cg, channels: list[int], edits: dict) -> None:
    """Add the edits of removing ``channels`` of group ``cg`` to ``edits`` ({name: (ins, outs, by)})."""
    modules = dict(cg.gm.named_modules())

    def edit(name, ins=(), outs=()):
        add_edit(edits, name, ins, outs, cg.layer)

    for m in cg.members:
        if m.role in ("shortcut_in", "shortcut_out") and not is_channel_map(modules.get(m.layer)):
            raise ValueError(f"{_FN}: the group of {cg.layer!r} passes a channel-padding shortcut written as a "
                             f"function ({m.layer!r}: F.pad); surgery needs it as a module with carfast_channel_map()"
                             " and set_channel_map(), such as carfast.models.OptionAShortcut")
        mapped = [m.channels[c] for c in channels]
        if m.role in ("output", "batchnorm"):
            edit(m.layer, outs=mapped)
        elif m.role == "input":
            edit(m.layer, ins=_expand(mapped, m.width))
        elif m.role == "shortcut_in":       # the channel no longer exists: it is not an input any more
            edit(m.layer, ins=channels)
        else:                               # shortcut_out: the output slot goes
            edit(m.layer, outs=channels)
