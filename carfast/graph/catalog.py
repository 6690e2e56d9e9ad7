"""What each operation does to channels: the one op catalogue every analysis reads.

``classify(op)`` returns a ``Rule``, one of:

- ``elementwise``: position by position over broadcast operands (activations, dropout and drop-path in
  eval, casts, add / mul / div, ``where``...). ``combine`` says how operands meet: "unary", "add"
  (their contents add up: a residual add couples producers) or "mul" (a gate: ``x * gate(x)``).
- ``reduce``: per position outside ``axes``, pooling or normalising along them (pooling, adaptive
  pools, interpolation, ``mean`` / ``sum`` / ``amax`` over dims, softmax, BatchNorm, InstanceNorm,
  GroupNorm with one group per channel). All positions along ``axes`` that meet belong together.
- ``move``: moves positions without computing (view / reshape / flatten / permute / transpose /
  cat / split / chunk / narrow / indexing / channel shuffle / spatial padding...): where each output
  position comes from is found by pushing position numbers through the op itself.
- ``depthwise``: a Conv2d with groups == in_channels: input channel c feeds outputs c*m .. c*m+m-1.
- ``mix``: a Conv2d or Linear (module, or ``F.conv2d`` / ``F.linear`` on the model's parameters): reads
  channels of its input (a *consumer*, where removal is applied) and makes new ones (a *producer*).
- ``norm``: LayerNorm over the channel axes, GroupNorm with one group: position by position like
  ``elementwise``, but deleting a channel renormalises over the channels that remain.
- ``channel_map``: a parameter-free shortcut that moves channels from one residual stream to the next
  (``models.OptionAShortcut``, or zero padding of the channel axis): a reader of its input's channels and
  an inlet of its output's (so residual stages stay separate groups, see ``groups``).
- ``unsupported`` (with ``why``); ops returning no tensor (shape queries, asserts) are ``ignore``.

``params`` lists the model's tensors an op applies per channel, as (where, axis): ``where`` an ``Op``
(a parameter op) or (module path, attribute); ``axis`` the data axis they align with. ``linear`` marks
ops affine in their data input (the closed form's tail).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.utils._pytree import tree_flatten

from carfast.graph.ir import Op, TensorMeta, is_channel_map, op_name

__all__ = ["Rule", "classify", "data_args"]


@dataclass
class Rule:
    kind: str
    combine: str = "unary"
    axes: tuple = ()                 # reduce / norm: the data axes (0 = batch) pooled or normalised
    params: list = field(default_factory=list)
    linear: bool = False
    why: str = ""
    groups: int = 1                  # mix: a conv's groups
    weight: object = None            # mix / depthwise: the module, or the weight parameter op
    bias: object = None
    in_axis: int = 1                 # mix: the axis of the input it mixes (1 conv, -1 linear)


def _rank(meta) -> int:
    return len(meta.shape) if isinstance(meta, TensorMeta) else 0


def data_args(op: Op, rule: Rule) -> list[Op]:
    """The data operands of ``op``: the tensors whose positions the rule relates to the output."""
    if rule.kind == "move":
        first = op.args[0] if op.args else None
        items = first if isinstance(first, (list, tuple)) else [first]
        return [a for a in items if isinstance(a, Op)]
    if rule.kind == "elementwise":
        return [a for a in tree_flatten((op.args, op.kwargs))[0]
                if isinstance(a, Op) and isinstance(a.meta, TensorMeta) and a.kind != "param"]
    return [op.args[0]] if op.args and isinstance(op.args[0], Op) else []


def _norm_axis(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


# ---- modules ------------------------------------------------------------------------------------------------
_UNARY_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh,
                  nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Softplus, nn.Softsign, nn.Tanhshrink,
                  nn.LogSigmoid, nn.Threshold, nn.Hardshrink, nn.Softshrink, nn.PReLU)
_IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                     nn.FeatureAlphaDropout)
_POOLS = {1: (nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d, nn.LPPool1d),
          2: (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.LPPool2d),
          3: (nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d)}
_LINEAR_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                 nn.AdaptiveAvgPool3d)
_MOVE_MODULES = (nn.Flatten, nn.Unflatten, nn.ChannelShuffle, nn.PixelShuffle, nn.PixelUnshuffle)
_PADS = (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
         nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d, nn.ReplicationPad2d,
         nn.ReplicationPad3d, nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d)


def _module_rule(op: Op) -> Rule:
    m = op.target
    x = op.args[0].meta if op.args and isinstance(op.args[0], Op) else None
    rank = _rank(x)
    if is_channel_map(m):
        return Rule("channel_map")
    if isinstance(m, _IDENTITY_MODULES):
        return Rule("elementwise", linear=True)
    if isinstance(m, _UNARY_MODULES):
        params = [((op.name, "weight"), 1)] if isinstance(m, nn.PReLU) and m.num_parameters > 1 else []
        return Rule("elementwise", params=params)
    for k, pools in _POOLS.items():
        if isinstance(m, pools):
            return Rule("reduce", axes=tuple(range(rank - k, rank)), linear=isinstance(m, _LINEAR_POOLS))
    if isinstance(m, nn.Upsample):
        return Rule("reduce", axes=tuple(range(2, rank)), linear=m.mode in ("nearest", "linear", "bilinear",
                                                                           "trilinear", "nearest-exact"))
    if isinstance(m, (nn.Softmax, nn.LogSoftmax, nn.Softmin)):
        return Rule("reduce", axes=(_norm_axis(m.dim if m.dim is not None else 1, rank),))
    if isinstance(m, _MOVE_MODULES):
        return Rule("move", linear=True)
    if isinstance(m, _PADS):
        return _pad_rule(tuple(m.padding) if not isinstance(m.padding, int) else (m.padding,) * 2 * (rank - 2),
                         getattr(m, "value", 0), "constant" if isinstance(m, (nn.ConstantPad1d, nn.ConstantPad2d,
                                                                            nn.ConstantPad3d)) else "other", rank)
    if isinstance(m, _BatchNorm):
        names = ("weight", "bias", "running_mean", "running_var")
        return Rule("reduce", params=[((op.name, p), 1) for p in names if getattr(m, p) is not None])
    if isinstance(m, _InstanceNorm):
        names = ("weight", "bias", "running_mean", "running_var")
        return Rule("reduce", axes=tuple(range(2, rank)),
                    params=[((op.name, p), 1) for p in names if getattr(m, p, None) is not None])
    if isinstance(m, nn.GroupNorm):
        return _group_norm_rule(m.num_groups, m.num_channels, [((op.name, p), 1) for p in ("weight", "bias")
                                                               if getattr(m, p) is not None], rank)
    if isinstance(m, nn.LayerNorm):
        k = len(m.normalized_shape)
        axes = tuple(range(rank - k, rank))
        return Rule("norm", axes=axes, params=[((op.name, p), axes[0]) for p in ("weight", "bias")
                                              if getattr(m, p, None) is not None])
    if isinstance(m, nn.Conv2d):
        if m.groups > 1 and m.groups == m.in_channels and m.out_channels % m.in_channels == 0:
            return Rule("depthwise", weight=m, groups=m.groups)
        return Rule("mix", weight=m, groups=m.groups, linear=True)
    if isinstance(m, nn.Linear):
        return Rule("mix", weight=m, in_axis=-1, linear=True)
    return Rule("unsupported", why=f"module {type(m).__name__}, which carfast does not know to act per channel, "
                                   "nor to be a Conv2d or Linear")


def _group_norm_rule(groups: int, channels: int, params: list, rank: int) -> Rule:
    if groups == channels:
        return Rule("reduce", axes=tuple(range(2, rank)), params=params)
    if groups == 1:
        return Rule("norm", axes=tuple(range(1, rank)), params=params)
    return Rule("unsupported", why=f"a GroupNorm with {groups} groups of {channels // groups} channels: deleting one "
                                   "channel would change which channels each group normalises")


def _pad_rule(pad: tuple, value, mode: str, rank: int) -> Rule:
    covered = len(pad) // 2                       # pads the last `covered` dims, last dim first
    channel = rank >= 2 and covered >= rank - 1 and any(pad[2 * (rank - 2):2 * (rank - 1)])
    if not channel:
        return Rule("move", linear=mode == "constant" and value in (None, 0, 0.0))
    if mode == "constant" and value in (None, 0, 0.0) and not any(pad[:2 * (rank - 2)]):
        return Rule("channel_map")
    return Rule("unsupported", why="padding of the channel axis that is not a plain zero channel padding")


# ---- functions ----------------------------------------------------------------------------------------------
_UNARY = frozenset({
    "relu", "relu6", "leaky_relu", "elu", "selu", "celu", "gelu", "silu", "sigmoid", "tanh", "hardswish",
    "hardsigmoid", "hardtanh", "mish", "softplus", "softsign", "logsigmoid", "tanhshrink", "threshold",
    "hardshrink", "softshrink", "abs", "neg", "exp", "log", "log1p", "sqrt", "rsqrt", "square", "erf", "sin",
    "cos", "reciprocal", "sign", "floor", "ceil", "round", "clamp", "clip", "clamp_min", "clamp_max",
    "nan_to_num", "logical_not", "bitwise_not"})
_IDENTITY = frozenset({"dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
                       "stochastic_depth", "drop_path", "clone", "detach", "to", "float", "half", "double",
                       "bfloat16", "type", "type_as", "identity", "contiguous"})
_ADD_LIKE = frozenset({"add", "sub", "rsub", "where", "maximum", "minimum", "fmax", "fmin", "lerp", "atan2",
                       "hypot", "fmod", "remainder", "eq", "ne", "gt", "ge", "lt", "le", "logical_and",
                       "logical_or", "addcmul", "addcdiv", "pow"})
_MUL_LIKE = frozenset({"mul", "div", "rdiv", "masked_fill"})
_MOVE = frozenset({"view", "reshape", "flatten", "unflatten", "permute", "transpose", "swapaxes", "swapdims",
                   "movedim", "moveaxis", "t", "squeeze", "unsqueeze", "expand", "expand_as", "repeat", "tile",
                   "cat", "stack", "split", "split_with_sizes", "chunk", "tensor_split", "narrow", "getitem",
                   "index_select", "unbind", "roll", "flip", "select", "channel_shuffle", "pixel_shuffle",
                   "pixel_unshuffle", "view_as", "reshape_as", "native_channel_shuffle"})
_POOL_FUNCTIONS = {"max_pool1d": 1, "avg_pool1d": 1, "adaptive_avg_pool1d": 1, "adaptive_max_pool1d": 1,
                   "lp_pool1d": 1, "max_pool2d": 2, "avg_pool2d": 2, "adaptive_avg_pool2d": 2,
                   "adaptive_max_pool2d": 2, "lp_pool2d": 2, "max_pool3d": 3, "avg_pool3d": 3,
                   "adaptive_avg_pool3d": 3, "adaptive_max_pool3d": 3, "max_pool2d_with_indices": 2,
                   "adaptive_max_pool2d_with_indices": 2}
_REDUCTIONS = frozenset({"mean", "sum", "amax", "amin", "max", "min", "std", "var", "logsumexp", "prod", "nansum",
                         "nanmean", "norm", "softmax", "log_softmax", "argmax", "argmin", "std_mean", "var_mean"})
_LINEAR_REDUCTIONS = frozenset({"mean", "sum", "nansum", "nanmean"})
_UNSUPPORTED = {
    "matmul": "a matrix product", "mm": "a matrix product", "bmm": "a batched matrix product",
    "einsum": "an einsum", "conv1d": "a 1-D convolution", "conv3d": "a 3-D convolution",
    "conv_transpose1d": "a transposed convolution", "conv_transpose2d": "a transposed convolution",
    "conv_transpose3d": "a transposed convolution", "scaled_dot_product_attention": "attention",
    "local_response_norm": "a local response norm, which mixes neighbouring channels",
    "normalize": "an L2 normalisation across channels", "glu": "a gated linear unit, which splits channels in two",
    "topk": "a top-k selection", "sort": "a sort", "gather": "a gather", "scatter": "a scatter",
}


def _arg(op: Op, i: int, name: str, default=None):
    if len(op.args) > i:
        return op.args[i]
    return op.kwargs.get(name, default)


def _value(v):
    """A plain value of an argument (an op's recorded value for ints computed in forward)."""
    return v.meta if isinstance(v, Op) and not isinstance(v.meta, TensorMeta) else v


def _dims(op: Op, rank: int, name: str) -> tuple | None:
    d = _value(_arg(op, 1, "dim"))
    if d is None or isinstance(d, (bool, Op)):
        return None
    d = (d,) if isinstance(d, int) else tuple(_value(v) for v in d)
    return tuple(sorted(_norm_axis(int(v), rank) for v in d))


def _function_rule(op: Op) -> Rule:
    name = op_name(op)
    x = op.args[0] if op.args else None
    rank = _rank(x.meta) if isinstance(x, Op) else 0
    if name in _IDENTITY:
        return Rule("elementwise", linear=True)
    if name in _UNARY:
        return Rule("elementwise")
    if name == "prelu":
        return Rule("elementwise", params=[(_arg(op, 1, "weight"), 1)])
    if name in _MUL_LIKE:
        return Rule("elementwise", combine="mul", linear=True)
    if name in _ADD_LIKE:
        return Rule("elementwise", combine="add", linear=name in ("add", "sub", "rsub"))
    if name in ("max", "min") and not isinstance(_value(_arg(op, 1, "dim")), int) and \
            isinstance(_arg(op, 1, "other"), Op):
        return Rule("elementwise", combine="add")
    if name in _MOVE:
        return Rule("move", linear=True)
    if name in _POOL_FUNCTIONS:
        k = _POOL_FUNCTIONS[name]
        return Rule("reduce", axes=tuple(range(rank - k, rank)), linear=name.startswith(("avg", "adaptive_avg")))
    if name in ("interpolate", "upsample", "upsample_nearest", "upsample_bilinear"):
        return Rule("reduce", axes=tuple(range(2, rank)), linear=True)
    if name in _REDUCTIONS:
        if name in ("softmax", "log_softmax"):
            d = _value(_arg(op, 1, "dim"))
            return Rule("reduce", axes=(_norm_axis(int(d), rank),)) if isinstance(d, int) else \
                Rule("unsupported", why=f"a {name} without a dim")
        dims = _dims(op, rank, name)
        if dims is None:
            return Rule("unsupported", why=f"{name!r} over the whole tensor (it mixes every channel)")
        return Rule("reduce", axes=dims, linear=name in _LINEAR_REDUCTIONS)
    if name == "batch_norm":
        return Rule("reduce", params=[(_arg(op, i, n), 1) for i, n in ((1, "running_mean"), (2, "running_var"),
                                                                       (3, "weight"), (4, "bias"))
                                      if _arg(op, i, n) is not None])
    if name == "instance_norm":
        return Rule("reduce", axes=tuple(range(2, rank)),
                    params=[(_arg(op, i, n), 1) for i, n in ((1, "running_mean"), (2, "running_var"), (3, "weight"),
                                                             (4, "bias")) if _arg(op, i, n) is not None])
    if name == "layer_norm":
        shape = _value(_arg(op, 1, "normalized_shape"))
        k = 1 if isinstance(shape, int) else len(shape)
        axes = tuple(range(rank - k, rank))
        return Rule("norm", axes=axes, params=[(_arg(op, i, n), axes[0]) for i, n in ((2, "weight"), (3, "bias"))
                                               if _arg(op, i, n) is not None])
    if name == "group_norm":
        groups = _value(_arg(op, 1, "num_groups"))
        channels = x.meta.shape[1] if isinstance(x, Op) else 0
        return _group_norm_rule(groups, channels, [(_arg(op, i, n), 1) for i, n in ((2, "weight"), (3, "bias"))
                                                   if _arg(op, i, n) is not None], rank)
    if name == "pad":
        return _pad_rule(tuple(_value(v) for v in _value(_arg(op, 1, "pad"))), _value(_arg(op, 3, "value", 0)),
                         _value(_arg(op, 2, "mode", "constant")), rank)
    if name == "conv2d":
        w, groups = _arg(op, 1, "weight"), _value(_arg(op, 6, "groups", 1))
        bias = _arg(op, 2, "bias")
        if not isinstance(w, Op) or not isinstance(w.meta, TensorMeta):
            return Rule("unsupported", why="a conv2d whose weight is not a tensor")
        out_ch, in_per_group = w.meta.shape[0], w.meta.shape[1]
        if groups > 1 and in_per_group == 1 and out_ch % groups == 0 and x.meta.shape[1] == groups:
            return Rule("depthwise", weight=w, bias=bias, groups=groups)
        return Rule("mix", weight=w, bias=bias, groups=groups, linear=True)
    if name == "linear":
        return Rule("mix", weight=_arg(op, 1, "weight"), bias=_arg(op, 2, "bias"), in_axis=-1, linear=True)
    if name in _UNSUPPORTED:
        return Rule("unsupported", why=_UNSUPPORTED[name])
    return Rule("unsupported", why=f"operation {name!r}, which carfast does not know to act per channel")


def classify(op: Op) -> Rule:
    """The rule of ``op`` (a module or function call); ``ignore`` when it returns no tensor."""
    if not any(isinstance(t, TensorMeta) for t in tree_flatten(op.meta)[0]):
        return Rule("ignore")
    if op.kind == "module":
        return _module_rule(op)
    if op.kind == "function":
        return _function_rule(op)
    return Rule("ignore")
