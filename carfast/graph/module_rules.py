"""What each ``torch.nn`` module type does to channels: carfast's own handlers (``registry.py``).

``module_rule(op)`` returns the ``Rule`` of a module call (``op.kind == "module"``): a channel-map
module (``carfast_channel_map()``) is a ``channel_map``; otherwise the rule of the handler of the most
derived class of the module that has one (``registry.handler_for``), or ``unsupported``. Each built-in
handler is a ``rule(module, op, rank) -> Rule`` function (``rank``: the number of dims of the module's
data input) registered here for its types.
"""
from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from carfast.graph.ir import Op, is_channel_map
from carfast.graph.registry import HANDLERS, ModuleHandler, handler_for
from carfast.graph.rule import Rule, group_norm_rule, norm_axis, pad_rule, rank_of

__all__ = ["module_rule"]

ModuleRule = Callable[[nn.Module, Op, int], Rule]


class _RuleHandler(ModuleHandler):
    """A built-in handler: one rule function."""

    def __init__(self, rule: ModuleRule):
        self._rule = rule

    def rule(self, module, op, rank):
        return self._rule(module, op, rank)


def _register(types, rule: ModuleRule) -> None:
    for t in types if isinstance(types, tuple) else (types,):
        HANDLERS[t] = _RuleHandler(rule)


def module_rule(op: Op) -> Rule:
    """The rule of module call ``op`` (module docstring)."""
    m = op.target
    if is_channel_map(m):
        return Rule("channel_map")
    handler = handler_for(m)
    if handler is None:
        return Rule("unsupported", why=f"module {type(m).__name__}, which carfast does not know to act per channel, "
                                       "nor to be a Conv2d or Linear; carfast.register_module can teach it")
    x = op.args[0].meta if op.args and isinstance(op.args[0], Op) else None
    rule = handler.rule(m, op, rank_of(x))
    if not isinstance(rule, Rule):
        raise TypeError(f"{type(handler).__name__}.rule returned {type(rule).__name__} for {op.label}; it must "
                        "return a carfast.graph.rule.Rule")
    return rule


def _params(op: Op, m: nn.Module, names, axis: int = 1) -> list:
    """The per-channel tensors ``names`` of module ``m`` that exist, as (where, axis)."""
    return [((op.name, p), axis) for p in names if getattr(m, p, None) is not None]


# ---- per position ---------------------------------------------------------------------------------------
_register((nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
           nn.FeatureAlphaDropout), lambda m, op, rank: Rule("elementwise", linear=True))
_register((nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh,
           nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Softplus, nn.Softsign, nn.Tanhshrink,
           nn.LogSigmoid, nn.Threshold, nn.Hardshrink, nn.Softshrink), lambda m, op, rank: Rule("elementwise"))
_register(nn.PReLU, lambda m, op, rank: Rule("elementwise", params=_params(op, m, ("weight",))
                                             if m.num_parameters > 1 else []))

# ---- pooling along axes -----------------------------------------------------------------------------------
_LINEAR_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                 nn.AdaptiveAvgPool3d)


def _pool(k: int) -> ModuleRule:
    return lambda m, op, rank: Rule("reduce", axes=tuple(range(rank - k, rank)), linear=isinstance(m, _LINEAR_POOLS))


_register((nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d, nn.LPPool1d), _pool(1))
_register((nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.LPPool2d), _pool(2))
_register((nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d), _pool(3))
_register(nn.Upsample, lambda m, op, rank: Rule("reduce", axes=tuple(range(2, rank)), linear=m.mode in (
    "nearest", "linear", "bilinear", "trilinear", "nearest-exact")))
_register((nn.Softmax, nn.LogSoftmax, nn.Softmin), lambda m, op, rank: Rule(
    "reduce", axes=(norm_axis(m.dim if m.dim is not None else 1, rank),)))

# ---- moves ------------------------------------------------------------------------------------------------
_register((nn.Flatten, nn.Unflatten, nn.ChannelShuffle, nn.PixelShuffle, nn.PixelUnshuffle),
          lambda m, op, rank: Rule("move", linear=True))
_CONSTANT_PADS = (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)


def _pad(m, op, rank) -> Rule:
    pad = tuple(m.padding) if not isinstance(m.padding, int) else (m.padding,) * 2 * (rank - 2)
    return pad_rule(pad, getattr(m, "value", 0), "constant" if isinstance(m, _CONSTANT_PADS) else "other", rank)


_register(_CONSTANT_PADS + (nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d,
                            nn.ReplicationPad2d, nn.ReplicationPad3d, nn.CircularPad1d, nn.CircularPad2d,
                            nn.CircularPad3d), _pad)

# ---- normalisers ------------------------------------------------------------------------------------------
_STATS = ("weight", "bias", "running_mean", "running_var")
_register(_BatchNorm, lambda m, op, rank: Rule("reduce", params=_params(op, m, _STATS)))
_register(_InstanceNorm, lambda m, op, rank: Rule("reduce", axes=tuple(range(2, rank)), params=_params(op, m, _STATS)))
_register(nn.GroupNorm, lambda m, op, rank: group_norm_rule(m.num_groups, m.num_channels,
                                                            _params(op, m, ("weight", "bias")), rank))


def _layer_norm(m, op, rank) -> Rule:
    axes = tuple(range(rank - len(m.normalized_shape), rank))
    return Rule("norm", axes=axes, params=_params(op, m, ("weight", "bias"), axes[0]))


_register(nn.LayerNorm, _layer_norm)


# ---- layers that mix channels -------------------------------------------------------------------------------
def _conv2d(m, op, rank) -> Rule:
    if m.groups > 1 and m.groups == m.in_channels and m.out_channels % m.in_channels == 0:
        return Rule("depthwise", weight=m, groups=m.groups)
    return Rule("mix", weight=m, groups=m.groups, linear=True)


_register(nn.Conv2d, _conv2d)
_register(nn.Linear, lambda m, op, rank: Rule("mix", weight=m, in_axis=-1, linear=True))
