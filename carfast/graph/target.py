"""What carfast scores and cuts: the filters of one layer, or the channels of a layer's coupling group.

A target is written as a layer (a name from ``model.named_modules()`` or the module itself) or as
``carfast.Group(layer)``: the coupling group of that layer, i.e. every layer whose output channels are
added into the same residual stream (``carfast.graph.find_group``). ``resolve_target`` reads it once;
``score_layer``, ``LayerScorer``, ``remove_filters`` and ``prune`` all take either form, and the group
forms (``score_group``, ``GroupScorer``, ``remove_groups``) are the same code with every target a group.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from carfast.errors import resolve_layer

__all__ = ["Group", "resolve_target", "target_spec"]


@dataclass(frozen=True)
class Group:
    """The coupling group of ``layer`` as a target: its channels are scored together and cut from every
    member (``carfast.score_layer(model, carfast.Group("layer2.0.conv2"), data)``).

    ``layer`` names any producer of the group (the stem conv, a block's last conv, a 1x1 shortcut conv):
    a name from ``model.named_modules()`` or the module. A layer coupled with no other is a group of one,
    scored and cut as the layer alone.
    """
    layer: str | nn.Module

    def __post_init__(self):
        if isinstance(self.layer, Group) or not isinstance(self.layer, (str, nn.Module)):
            raise TypeError(f"Group: layer must be a module name (str) or an nn.Module, got "
                            f"{type(self.layer).__name__}")

    def __repr__(self) -> str:
        inner = repr(self.layer) if isinstance(self.layer, str) else type(self.layer).__name__
        return f"Group({inner})"


def resolve_target(model: nn.Module, target, fn: str, group: bool = False) -> tuple[str, nn.Module, bool]:
    """``(name, module, group)`` of ``target`` (a layer or a ``Group``); ``group=True`` makes every target a
    group (the ``*_group`` forms). Errors name ``fn`` and the fix (``errors.resolve_layer``)."""
    if isinstance(target, Group):
        target, group = target.layer, True
    name, module = resolve_layer(model, target, fn)
    return name, module, group


def target_spec(name: str, group: bool) -> str | Group:
    """The target ``resolve_target`` reads back as ``(name, ..., group)``."""
    return Group(name) if group else name
