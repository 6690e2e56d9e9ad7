"""Find a layer's consumers by recording one forward pass, for models torch.fx cannot trace.

A ``TorchFunctionMode`` records every torch function called outside leaf modules, and module hooks
record every leaf module call, each with its input and output tensors; following the target's output
tensor through these records with the same rules as the fx analysis (``ops_catalog.py``) gives the
consumer modules and the width each filter owns in their input. The full-network path then applies
removal with forward pre-hooks on those modules.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from .graph import TraceError, analyze
from .ops_catalog import classify_function, classify_module

__all__ = ["find_consumers", "DynamicConsumer", "discover_consumers", "recorded_consumers", "record_forward"]


@dataclass
class DynamicConsumer:
    """A consumer module found by recording; filter k owns input slice [k*width, (k+1)*width)."""
    name: str
    module: nn.Module
    width: int


@dataclass
class _Event:
    kind: str            # "module" or "function"
    name: str            # module name or function name
    module: nn.Module | None
    inputs: list         # tensors, in argument order
    outputs: list        # tensors


def _tensors(obj) -> list:
    return [t for t in tree_leaves(obj) if isinstance(t, torch.Tensor)]


class _Recorder(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.events: list[_Event] = []
        self.depth = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.depth == 0:
            outs = _tensors(out)
            if outs:  # shape queries and other non-tensor results carry no channel data
                name = getattr(func, "__name__", str(func))
                self.events.append(_Event("function", name, None, _tensors((args, kwargs)), outs))
        return out


def record_forward(model: nn.Module, example: torch.Tensor):
    """Run ``model`` on ``example`` once, recording every module call and torch function it makes.

    Returns (events, output): the recorded calls in order and the model's output.
    """
    rec = _Recorder()
    handles = []

    def pre(_m, _args):
        rec.depth += 1

    def make_post(name):
        def post(m, args, out):
            rec.depth -= 1
            if rec.depth == 0:
                rec.events.append(_Event("module", name, m, _tensors(args), _tensors(out)))
        return post

    for name, m in model.named_modules():
        if name and not any(True for _ in m.children()):
            handles.append(m.register_forward_pre_hook(pre))
            handles.append(m.register_forward_hook(make_post(name)))
    try:
        with torch.no_grad(), rec:
            out = model(example)
    finally:
        for h in handles:
            h.remove()
    return rec.events, out


def find_consumers(model: nn.Module, name: str, example: torch.Tensor, fn: str) -> list:
    """The consumers of layer ``name`` (objects with ``name``, ``module``, ``width``): from the torch.fx
    analysis (``graph.analyze``), or one recorded forward pass when fx cannot trace the model; their
    errors name ``fn``. ``example`` is one input [1, ...]."""
    try:
        with torch.no_grad():
            return analyze(model, name, example, fn).consumers
    except TraceError:
        return discover_consumers(model, name, example, fn)


def discover_consumers(model: nn.Module, name: str, example: torch.Tensor,
                       fn: str = "score_layer") -> list[DynamicConsumer]:
    """The consumers of layer ``name`` and the width each filter owns in their inputs.

    Raises ValueError, as the fx analysis does, when the channels are coupled (residual add, concat),
    reach an unsupported op, or reach the output without a consumer; ``fn`` names the caller in them.
    """
    return recorded_consumers(*record_forward(model, example), name, fn)


def recorded_consumers(events, out, name: str, fn: str = "score_layer") -> list[DynamicConsumer]:
    """``discover_consumers`` on a forward pass already recorded by ``record_forward`` (events, output)."""
    calls = [i for i, e in enumerate(events) if e.kind == "module" and e.name == name]
    if len(calls) != 1:
        raise ValueError(f"{fn}: layer {name!r} is called {len(calls)} times in forward; it must run "
                         "exactly once")
    start = calls[0]
    frontier = [(events[start].outputs[0], 1, start)]
    seen_events, consumers = {start}, []
    model_outputs = {id(t) for t in _tensors(out)}
    while frontier:
        tensor, width, after = frontier.pop()
        if id(tensor) in model_outputs:
            raise ValueError(f"{fn}: layer {name!r} has no consumer on the path to the output; score a "
                             "layer that feeds a Conv2d or Linear")
        for i in range(after + 1, len(events)):
            e = events[i]
            if i in seen_events or not any(t is tensor for t in e.inputs):
                continue
            seen_events.add(i)
            in_shape, out_shape = tuple(tensor.shape), tuple(e.outputs[0].shape)
            if e.kind == "module":
                kind, info = classify_module(e.module, in_shape, out_shape)
            else:
                kind, info = classify_function(e.name.strip("_"), in_shape, out_shape)
                if e.name in ("__add__", "__iadd__", "__radd__"):
                    kind, info = "coupled", "add"
            if kind == "shape":
                continue
            if kind == "coupled":
                raise ValueError(f"{fn}: layer {name!r} cannot be scored on its own: its channels enter "
                                 f"{info!r}, a residual add / concat that couples them with another layer's "
                                 "channels; score a layer whose output feeds only convolutions or linears")
            if kind == "unsupported":
                raise ValueError(f"{fn}: layer {name!r}: its channels reach {e.name!r}, {info}")
            if e.inputs[0] is not tensor or sum(t is tensor for t in e.inputs) > 1:
                raise ValueError(f"{fn}: layer {name!r}: its channels reach {e.name!r} as other than "
                                 "its only input")
            if kind == "consumer":
                consumers.append(DynamicConsumer(e.name, e.module, width))
            else:
                frontier.append((e.outputs[0], width * info, i))
    if not consumers:
        raise ValueError(f"{fn}: layer {name!r} has no consumer (Conv2d or Linear module) on the path "
                         "to the output; score a layer that feeds one")
    return consumers
