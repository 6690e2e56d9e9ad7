"""Which operations carry a filter's channel unchanged, which consume it, and which couple it.

Shared by the torch.fx analysis (``graph.py``) and the traced-at-run-time analysis for models fx
cannot trace (``dynamic_graph.py``), so both agree on what "removing a filter" reaches.

A *chain* op maps channel k of its input to channel(s) of its output and nothing else (BatchNorm,
activations, pooling, dropout, depthwise convs, flatten); a *consumer* mixes channels (a Conv2d, or a
Linear on a flattened map) and is where removal is applied, by zeroing the channels the filter owns
in its input. Anything else that reads the channels (an add, a concat, an indexing op) couples them
to other tensors, and ``score_layer`` refuses rather than return a different quantity.
"""
from __future__ import annotations

import math

from torch import nn

__all__ = ["CHAIN_MODULES", "CHAIN_FUNCTIONS", "SHAPE_QUERIES", "COUPLING_FUNCTIONS", "FLATTEN_FUNCTIONS",
           "is_depthwise", "is_channel_map", "classify_module", "classify_function", "describe_target"]

#: module types that act on each channel separately (channel count preserved)
CHAIN_MODULES = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid,
    nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Softplus, nn.Identity, nn.Dropout,
    nn.Dropout2d, nn.AlphaDropout, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
)

#: function / method names that act on each channel separately
CHAIN_FUNCTIONS = frozenset({
    "relu", "relu_", "relu6", "hardtanh", "hardtanh_", "leaky_relu", "leaky_relu_", "elu", "elu_", "gelu",
    "silu", "sigmoid", "sigmoid_", "tanh", "tanh_", "hardswish", "hardsigmoid", "mish", "softplus",
    "dropout", "dropout2d", "alpha_dropout", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d",
    "adaptive_max_pool2d", "batch_norm", "contiguous", "clone", "detach", "float", "to",
})

#: function / method names that flatten dims 1.. into one (channel k then owns a block of features)
FLATTEN_FUNCTIONS = frozenset({"flatten", "view", "reshape"})

#: reads of shape only: they carry no channel data
SHAPE_QUERIES = frozenset({"size", "dim", "numel", "shape", "getattr"})

#: ops that combine the channels with other tensors: the channel cannot be removed from this layer alone
COUPLING_FUNCTIONS = frozenset({"add", "add_", "iadd", "__add__", "__iadd__", "__radd__", "sub", "__sub__",
                                "mul", "mul_", "__mul__", "cat", "concat", "stack"})


def is_depthwise(m: nn.Module) -> bool:
    """A Conv2d in which each output channel reads a single input channel (channel multiplier m)."""
    return (isinstance(m, nn.Conv2d) and m.groups == m.in_channels and m.groups > 1
            and m.out_channels % m.in_channels == 0)


def is_channel_map(m: nn.Module) -> bool:
    """A parameter-free shortcut that moves channels from one residual stream to another (it has
    ``carfast_channel_map() -> (in_channels, out_channels, src, dst)``, e.g. ``models.OptionAShortcut``)."""
    return callable(getattr(m, "carfast_channel_map", None))


def describe_target(m: nn.Module) -> str:
    return type(m).__name__


def classify_module(m: nn.Module, in_shape, out_shape):
    """Classify a module call that reads the filter's channels as its first input.

    Returns ``("chain", factor)`` where one input channel becomes ``factor`` output channels (or
    features), ``("consumer", None)``, or ``("unsupported", why)``.
    """
    if isinstance(m, CHAIN_MODULES):
        return "chain", 1
    if is_channel_map(m):
        return "coupled", f"{type(m).__name__} (a channel-padding shortcut into the next stage's residual stream)"
    if is_depthwise(m):
        return "chain", m.out_channels // m.in_channels
    if isinstance(m, nn.Flatten):
        return _flatten_factor(in_shape, out_shape)
    if isinstance(m, nn.Conv2d):
        return "consumer", None
    if isinstance(m, nn.Linear):
        if in_shape is not None and len(in_shape) != 2:
            return "unsupported", (f"a Linear applied to a rank-{len(in_shape)} tensor (it mixes the last "
                                   "dimension, not the channels)")
        return "consumer", None
    return "unsupported", f"module {type(m).__name__} (not known to act per channel, nor a Conv2d/Linear)"


def classify_function(name: str, in_shape, out_shape):
    """Classify a function / method call (by name) that reads the filter's channels; same returns."""
    if name in SHAPE_QUERIES:
        return "shape", None
    if name in CHAIN_FUNCTIONS:
        return "chain", 1
    if name in FLATTEN_FUNCTIONS:
        return _flatten_factor(in_shape, out_shape)
    if name in COUPLING_FUNCTIONS:
        return "coupled", name
    return "unsupported", f"operation {name!r} (not known to act per channel)"


def _flatten_factor(in_shape, out_shape):
    if in_shape is None or out_shape is None:
        return "unsupported", "a reshape whose shapes are unknown"
    if len(in_shape) >= 2 and len(out_shape) == 2 and out_shape[0] == in_shape[0] \
            and out_shape[1] == math.prod(in_shape[1:]):
        return "chain", math.prod(in_shape[2:])
    if tuple(in_shape) == tuple(out_shape):
        return "chain", 1
    return "unsupported", f"a reshape from {tuple(in_shape)} to {tuple(out_shape)} that is not a flatten of dims 1.."
