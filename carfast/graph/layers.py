"""``carfast.layers(model)``: every Conv2d / Linear of a network and what carfast can do with it.

For each layer, the channel-flow analysis (``carfast.graph``) says one of:

- "layer": ``score_layer`` scores its filters alone (and ``remove_filters`` cuts them);
- "group": its channels are tied to other layers' (a residual stream, a squeeze-and-excitation gate
  on a stream...): ``score_group`` scores the group's channels and ``remove_groups`` cuts them;
  ``group`` names the group's producers;
- "refused": neither, with the reason (the op where carfast stops, or why removal is not defined).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from carfast.batching import eval_mode
from carfast.graph import FlowError, analyze, build_graph
from carfast.graph.example import infer_example
from carfast.graph.registry import layer_filters

__all__ = ["LayerInfo", "layers"]

_FN = "layers"


@dataclass
class LayerInfo:
    """What carfast can do with one layer (see the module docstring)."""
    name: str
    type: str                      # "Conv2d" / "Linear"
    filters: int                   # output channels / features
    status: str                    # "layer", "group" or "refused"
    units: int = 0                 # channels scored: the filters, or the group's (paired channels count once)
    group: list = field(default_factory=list)   # the group's producers (status "group")
    reason: str = ""               # why it is refused
    reason_tag: str = ""           # ``FlowError.reason``

    def to_dict(self) -> dict:
        return asdict(self)


def _info(model, name, module, ex, graph) -> LayerInfo:
    base = dict(name=name, type=type(module).__name__, filters=layer_filters(module))
    try:
        flow = analyze(model, name, ex, "score_layer", graph=graph)
        return LayerInfo(status="layer", units=flow.num_units, **base)
    except FlowError as err:
        if err.reason not in ("coupled", "merge"):
            return LayerInfo(status="refused", reason=str(err), reason_tag=err.reason, **base)
    try:
        flow = analyze(model, name, ex, "score_group", group=True, graph=graph)
    except FlowError as err:
        return LayerInfo(status="refused", reason=str(err), reason_tag=err.reason, **base)
    producers = [p.op.name for p in flow.producers if p.kind != "channel_map"]
    return LayerInfo(status="group", units=flow.num_units, group=producers, **base)


def layers(model: nn.Module, example: torch.Tensor | None = None) -> list[LayerInfo]:
    """``LayerInfo`` of every Conv2d and Linear of ``model`` (and module of a type registered with
    ``filters``), in ``named_modules`` order.

    ``example``: one input [1, ...] (inferred as ``remove_filters`` does when None). The model is run
    once in eval mode and left as it came."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{_FN}: model must be a torch.nn.Module, got {type(model).__name__}")
    with eval_mode(model), torch.no_grad():
        ex, _ = infer_example(model, example, _FN)
        graph = build_graph(model, ex)
        return [_info(model, name, m, ex, graph) for name, m in model.named_modules()
                if layer_filters(m) is not None]
