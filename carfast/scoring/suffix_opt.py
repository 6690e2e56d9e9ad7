"""Faster execution of a suffix graph, the same arithmetic up to float rounding.

``optimized_suffix(suffix, channels_last)`` returns a copy of the suffix (the user's modules are never
touched) with:

1. Conv2d -> BatchNorm pairs folded into one conv (``torch.fx.experimental.optimization.fuse``);
2. on CPU with oneDNN, ``relu(conv(x))`` and ``relu(conv(x) + other)`` each run as one oneDNN
   convolution with a fused post-op (oneDNN's private op, behind ``ops/onednn.py``), saving the elementwise
   passes.
   The graph calls ``conv_relu`` / ``conv_add_relu``, which take the oneDNN kernel where this CPU's
   oneDNN runs the input's dtype (``onednn_supports``: float32 always; bfloat16 needs AVX-512 BF16 or
   AMX, float16 AVX-512-FP16 or AVX-NE-CONVERT) and the same arithmetic in plain PyTorch elsewhere, so
   one suffix serves every precision on every CPU;
3. weights (and so the preferred activations) in channels_last, faster for oneDNN on CPU.

Results equal the plain suffix up to float rounding (about 1e-6 relative), so accuracy figures differ
only at near-tie images, as the exactness contract allows; the tests check image by image.
"""
from __future__ import annotations

import copy
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from carfast.ops import onednn

__all__ = ["optimized_suffix", "onednn_supports", "conv_relu", "conv_add_relu"]

_RELU_FUNCTIONS = ("relu", "relu_")


#: whether this CPU's oneDNN runs convolutions in a dtype (``ops.onednn.supports``)
onednn_supports = onednn.supports


def conv_relu(x, weight, bias, padding, stride, dilation, groups):
    """relu(conv2d(x)): one oneDNN convolution with a fused ReLU where ``onednn_supports(x.dtype)``."""
    if onednn_supports(x.dtype):
        return onednn.conv_relu(x, weight, bias, padding, stride, dilation, groups)
    return torch.relu(F.conv2d(x, weight, bias, stride, padding, dilation, groups))


def conv_add_relu(x, other, weight, bias, padding, stride, dilation, groups):
    """relu(conv2d(x) + other): one oneDNN convolution with fused add and ReLU where supported."""
    if onednn_supports(x.dtype):
        return onednn.conv_add_relu(x, other, weight, bias, padding, stride, dilation, groups)
    return torch.relu(F.conv2d(x, weight, bias, stride, padding, dilation, groups) + other)


def _is_relu(node: fx.Node, modules: dict) -> bool:
    if node.op == "call_module":
        return type(modules[node.target]) is nn.ReLU
    if node.op in ("call_function", "call_method"):
        name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
        return name in _RELU_FUNCTIONS and len(node.args) == 1
    return False


def _fusable_conv(node: fx.Node, modules: dict) -> bool:
    if node.op != "call_module" or len(node.users) != 1:
        return False
    m = modules[node.target]
    return type(m) is nn.Conv2d and m.padding_mode == "zeros" and not isinstance(m.padding, str)


def _conv_args(gm: fx.GraphModule, node: fx.Node, m: nn.Conv2d):
    g = gm.graph
    with g.inserting_before(node):
        w = g.get_attr(f"{node.target}.weight")
        b = g.get_attr(f"{node.target}.bias") if m.bias is not None else None
    return w, b, list(m.padding), list(m.stride), list(m.dilation), m.groups


def _fuse_pointwise(gm: fx.GraphModule) -> int:
    """Replace conv->relu and conv->add->relu by fused oneDNN convolutions. Returns how many."""
    modules = dict(gm.named_modules())
    fused = 0
    for node in list(gm.graph.nodes):
        if not _fusable_conv(node, modules):
            continue
        m = modules[node.target]
        user = next(iter(node.users))
        if _is_relu(user, modules):
            w, b, pad, stride, dil, groups = _conv_args(gm, node, m)
            with gm.graph.inserting_before(user):
                new = gm.graph.call_function(conv_relu, (node.args[0], w, b, pad, stride, dil, groups))
            user.replace_all_uses_with(new)
            gm.graph.erase_node(user)
            gm.graph.erase_node(node)
            fused += 1
        elif user.op == "call_function" and user.target in (operator.add, torch.add) and len(user.args) == 2 \
                and not user.kwargs and len(user.users) == 1 and _is_relu(next(iter(user.users)), modules):
            other = user.args[1] if user.args[0] is node else user.args[0]
            if other is node or not isinstance(other, fx.Node):
                continue
            relu = next(iter(user.users))
            w, b, pad, stride, dil, groups = _conv_args(gm, node, m)
            with gm.graph.inserting_before(relu):
                new = gm.graph.call_function(conv_add_relu, (node.args[0], other, w, b, pad, stride, dil, groups))
            relu.replace_all_uses_with(new)
            for dead in (relu, user, node):
                gm.graph.erase_node(dead)
            fused += 1
    gm.graph.lint()
    gm.recompile()
    return fused


def _pointwise_fusion_available() -> bool:
    return onednn.available()


def optimized_suffix(suffix: fx.GraphModule, channels_last: bool, fuse_pointwise: bool = True) -> fx.GraphModule:
    """A faster copy of ``suffix`` (see module docstring); the CPU-only oneDNN fusion only when
    ``channels_last`` (the CPU layout) and available."""
    from torch.fx.experimental.optimization import fuse
    opt = fuse(copy.deepcopy(suffix), inplace=True, no_trace=True)
    if channels_last:
        opt = opt.to(memory_format=torch.channels_last)
        if fuse_pointwise and _pointwise_fusion_available():
            _fuse_pointwise(opt)
    return opt
