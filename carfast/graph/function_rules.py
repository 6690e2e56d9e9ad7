"""What each function (``torch.*``, ``F.*``, tensor methods, operators) does to channels.

``function_rule(op)`` returns the ``Rule`` of a function call: ``RULES`` maps a canonical operation name
(``ir.op_name``: ``add`` for ``operator.add``, ``Tensor.add_`` and ``torch.add``) to
``rule(op, rank) -> Rule`` (``rank``: the number of dims of the first argument); names not there are
``unsupported``, those in ``_UNSUPPORTED`` with the reason.
"""
from __future__ import annotations

from collections.abc import Callable

from carfast.graph.ir import Op, TensorMeta, op_name
from carfast.graph.rule import Rule, group_norm_rule, norm_axis, pad_rule, rank_of

__all__ = ["RULES", "function_rule"]

FunctionRule = Callable[[Op, int], Rule]
RULES: dict[str, FunctionRule] = {}


def _register(names, rule: FunctionRule) -> None:
    for name in names:
        RULES[name] = rule


def function_rule(op: Op) -> Rule:
    """The rule of function call ``op`` (module docstring)."""
    name = op_name(op)
    x = op.args[0] if op.args else None
    rule = RULES.get(name)
    if rule is not None:
        return rule(op, rank_of(x.meta) if isinstance(x, Op) else 0)
    if name in _UNSUPPORTED:
        return Rule("unsupported", why=_UNSUPPORTED[name])
    return Rule("unsupported", why=f"operation {name!r}, which carfast does not know to act per channel")


def _arg(op: Op, i: int, name: str, default=None):
    if len(op.args) > i:
        return op.args[i]
    return op.kwargs.get(name, default)


def _value(v):
    """A plain value of an argument (an op's recorded value for ints computed in forward)."""
    return v.meta if isinstance(v, Op) and not isinstance(v.meta, TensorMeta) else v


def _present(op: Op, slots, axis: int = 1) -> list:
    """The tensor arguments at ``slots`` ((position, keyword), ...) that were passed, as (where, axis)."""
    return [(_arg(op, i, n), axis) for i, n in slots if _arg(op, i, n) is not None]


# ---- per position -----------------------------------------------------------------------------------------
_register(("dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
           "stochastic_depth", "drop_path", "clone", "detach", "to", "float", "half", "double", "bfloat16", "type",
           "type_as", "identity", "contiguous"), lambda op, rank: Rule("elementwise", linear=True))
_register(("relu", "relu6", "leaky_relu", "elu", "selu", "celu", "gelu", "silu", "sigmoid", "tanh", "hardswish",
           "hardsigmoid", "hardtanh", "mish", "softplus", "softsign", "logsigmoid", "tanhshrink", "threshold",
           "hardshrink", "softshrink", "abs", "neg", "exp", "log", "log1p", "sqrt", "rsqrt", "square", "erf", "sin",
           "cos", "reciprocal", "sign", "floor", "ceil", "round", "clamp", "clip", "clamp_min", "clamp_max",
           "nan_to_num", "logical_not", "bitwise_not"), lambda op, rank: Rule("elementwise"))
_register(("prelu",), lambda op, rank: Rule("elementwise", params=[(_arg(op, 1, "weight"), 1)]))
_register(("mul", "div", "rdiv", "masked_fill"), lambda op, rank: Rule("elementwise", combine="mul", linear=True))
_register(("add", "sub", "rsub", "where", "maximum", "minimum", "fmax", "fmin", "lerp", "atan2", "hypot", "fmod",
           "remainder", "eq", "ne", "gt", "ge", "lt", "le", "logical_and", "logical_or", "addcmul", "addcdiv",
           "pow"), lambda op, rank: Rule("elementwise", combine="add", linear=op_name(op) in ("add", "sub", "rsub")))

# ---- moves ------------------------------------------------------------------------------------------------
_register(("view", "reshape", "flatten", "unflatten", "permute", "transpose", "swapaxes", "swapdims", "movedim",
           "moveaxis", "t", "squeeze", "unsqueeze", "expand", "expand_as", "repeat", "tile", "cat", "stack", "split",
           "split_with_sizes", "chunk", "tensor_split", "narrow", "getitem", "index_select", "unbind", "roll", "flip",
           "select", "channel_shuffle", "pixel_shuffle", "pixel_unshuffle", "view_as", "reshape_as",
           "native_channel_shuffle"), lambda op, rank: Rule("move", linear=True))
_register(("pad",), lambda op, rank: pad_rule(tuple(_value(v) for v in _value(_arg(op, 1, "pad"))),
                                              _value(_arg(op, 3, "value", 0)), _value(_arg(op, 2, "mode", "constant")),
                                              rank))


# ---- pooling and reductions along axes ----------------------------------------------------------------------
def _pool(k: int, linear: bool) -> FunctionRule:
    return lambda op, rank: Rule("reduce", axes=tuple(range(rank - k, rank)), linear=linear)


for _k in (1, 2, 3):
    _register((f"max_pool{_k}d", f"adaptive_max_pool{_k}d"), _pool(_k, False))
    _register((f"avg_pool{_k}d", f"adaptive_avg_pool{_k}d"), _pool(_k, True))
_register(("lp_pool1d",), _pool(1, False))
_register(("lp_pool2d", "max_pool2d_with_indices", "adaptive_max_pool2d_with_indices"), _pool(2, False))
_register(("interpolate", "upsample", "upsample_nearest", "upsample_bilinear"),
          lambda op, rank: Rule("reduce", axes=tuple(range(2, rank)), linear=True))


def _softmax(op: Op, rank: int) -> Rule:
    d = _value(_arg(op, 1, "dim"))
    if isinstance(d, int):
        return Rule("reduce", axes=(norm_axis(int(d), rank),))
    return Rule("unsupported", why=f"a {op_name(op)} without a dim")


def _reduction(op: Op, rank: int) -> Rule:
    d = _value(_arg(op, 1, "dim"))
    if d is None or isinstance(d, (bool, Op)):
        return Rule("unsupported", why=f"{op_name(op)!r} over the whole tensor (it mixes every channel)")
    d = (d,) if isinstance(d, int) else tuple(_value(v) for v in d)
    axes = tuple(sorted(norm_axis(int(v), rank) for v in d))
    return Rule("reduce", axes=axes, linear=op_name(op) in ("mean", "sum", "nansum", "nanmean"))


def _max_min(op: Op, rank: int) -> Rule:
    """``max`` / ``min`` of two tensors is per position; over a dim, a reduction."""
    if not isinstance(_value(_arg(op, 1, "dim")), int) and isinstance(_arg(op, 1, "other"), Op):
        return Rule("elementwise", combine="add")
    return _reduction(op, rank)


_register(("softmax", "log_softmax"), _softmax)
_register(("mean", "sum", "amax", "amin", "std", "var", "logsumexp", "prod", "nansum", "nanmean", "norm", "argmax",
           "argmin", "std_mean", "var_mean"), _reduction)
_register(("max", "min"), _max_min)

# ---- normalisers ------------------------------------------------------------------------------------------
_STATS = ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias"))
_register(("batch_norm",), lambda op, rank: Rule("reduce", params=_present(op, _STATS)))
_register(("instance_norm",), lambda op, rank: Rule("reduce", axes=tuple(range(2, rank)), params=_present(op, _STATS)))


def _layer_norm(op: Op, rank: int) -> Rule:
    shape = _value(_arg(op, 1, "normalized_shape"))
    axes = tuple(range(rank - (1 if isinstance(shape, int) else len(shape)), rank))
    return Rule("norm", axes=axes, params=_present(op, ((2, "weight"), (3, "bias")), axes[0]))


def _group_norm(op: Op, rank: int) -> Rule:
    x = op.args[0] if op.args else None
    channels = x.meta.shape[1] if isinstance(x, Op) else 0
    return group_norm_rule(_value(_arg(op, 1, "num_groups")), channels, _present(op, ((2, "weight"), (3, "bias"))),
                           rank)


_register(("layer_norm",), _layer_norm)
_register(("group_norm",), _group_norm)


# ---- layers that mix channels -------------------------------------------------------------------------------
def _conv2d(op: Op, rank: int) -> Rule:
    w, groups, bias = _arg(op, 1, "weight"), _value(_arg(op, 6, "groups", 1)), _arg(op, 2, "bias")
    if not isinstance(w, Op) or not isinstance(w.meta, TensorMeta):
        return Rule("unsupported", why="a conv2d whose weight is not a tensor")
    out_ch, in_per_group = w.meta.shape[0], w.meta.shape[1]
    if groups > 1 and in_per_group == 1 and out_ch % groups == 0 and op.args[0].meta.shape[1] == groups:
        return Rule("depthwise", weight=w, bias=bias, groups=groups)
    return Rule("mix", weight=w, bias=bias, groups=groups, linear=True)


_register(("conv2d",), _conv2d)
_register(("linear",), lambda op, rank: Rule("mix", weight=_arg(op, 1, "weight"), bias=_arg(op, 2, "bias"),
                                             in_axis=-1, linear=True))

_UNSUPPORTED = {
    "matmul": "a matrix product", "mm": "a matrix product", "bmm": "a batched matrix product",
    "einsum": "an einsum", "conv1d": "a 1-D convolution", "conv3d": "a 3-D convolution",
    "conv_transpose1d": "a transposed convolution", "conv_transpose2d": "a transposed convolution",
    "conv_transpose3d": "a transposed convolution", "scaled_dot_product_attention": "attention",
    "local_response_norm": "a local response norm, which mixes neighbouring channels",
    "normalize": "an L2 normalisation across channels", "glu": "a gated linear unit, which splits channels in two",
    "topk": "a top-k selection", "sort": "a sort", "gather": "a gather", "scatter": "a scatter",
}
