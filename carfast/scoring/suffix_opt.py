"""Faster execution of a suffix graph, the same arithmetic up to float rounding.

``optimized_suffix(suffix, channels_last)`` returns a copy of the suffix (the user's modules are never
touched) with:

1. Conv2d -> BatchNorm pairs folded into one conv (``torch.fx.experimental.optimization.fuse``);
2. on CPU with oneDNN, ``relu(conv(x))`` and ``relu(conv(x) + other)`` each run as one oneDNN
   convolution with a fused post-op (oneDNN's private op, behind ``ops/onednn.py``), saving the elementwise
   passes, and every other convolution calls ``conv2d``.
   The graph calls ``conv_relu`` / ``conv_add_relu`` / ``conv2d``, which take the oneDNN kernel where this
   CPU's oneDNN runs the input's dtype (``onednn_supports``: float32 always; bfloat16 needs AVX-512 BF16 or
   AMX, float16 AVX-512-FP16 or AVX-NE-CONVERT) and plain PyTorch elsewhere, so one suffix serves every
   precision on every CPU (and on a GPU, where they are plain PyTorch). On a CPU without native bf16 /
   fp16 convolutions PyTorch's own low-precision convolution is about 10x slower than float32's (12x for
   a 16-channel 3x3 convolution on an AVX2 CPU), so there they compute in float32 from the same
   low-precision operands and round the result once to the input's dtype: what a native kernel with
   float32 accumulation computes, up to the order of summation (``emulates_low_precision``);
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

__all__ = ["optimized_suffix", "onednn_supports", "emulates_low_precision", "conv2d", "conv_relu",
           "conv_add_relu"]

_RELU_FUNCTIONS = ("relu", "relu_")


#: whether this CPU's oneDNN runs convolutions in a dtype (``ops.onednn.supports``)
onednn_supports = onednn.supports


def emulates_low_precision(dtype: torch.dtype, device) -> bool:
    """Whether ``dtype`` is bf16 / fp16 on a CPU ``device`` whose oneDNN cannot convolve it natively, so the
    convolutions here compute in float32 and round (module docstring)."""
    return torch.device(device).type == "cpu" and dtype in (torch.bfloat16, torch.float16) \
        and not onednn_supports(dtype)


def _onednn_runs(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and onednn_supports(x.dtype)


def _conv_f32(x, weight, bias, padding, stride, dilation, groups) -> torch.Tensor:
    """conv2d of the operands' values in float32 (exact products, float32 sums)."""
    b = None if bias is None else bias.float()
    return F.conv2d(x.float(), weight.float(), b, stride, padding, dilation, groups)


def conv2d(x, weight, bias, padding, stride, dilation, groups):
    """conv2d(x) in x's dtype: float32 arithmetic rounded once where ``emulates_low_precision``."""
    if emulates_low_precision(x.dtype, x.device):
        return _conv_f32(x, weight, bias, padding, stride, dilation, groups).to(x.dtype)
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


def conv_relu(x, weight, bias, padding, stride, dilation, groups):
    """relu(conv2d(x)): one oneDNN convolution with a fused ReLU where this CPU's oneDNN runs x's dtype."""
    if _onednn_runs(x):
        return onednn.conv_relu(x, weight, bias, padding, stride, dilation, groups)
    return torch.relu(conv2d(x, weight, bias, padding, stride, dilation, groups))


def conv_add_relu(x, other, weight, bias, padding, stride, dilation, groups):
    """relu(conv2d(x) + other): one oneDNN convolution with fused add and ReLU where supported; emulated,
    the sum is rounded once, as oneDNN's float32 post-ops do."""
    if _onednn_runs(x):
        return onednn.conv_add_relu(x, other, weight, bias, padding, stride, dilation, groups)
    if emulates_low_precision(x.dtype, x.device):
        y = _conv_f32(x, weight, bias, padding, stride, dilation, groups)
        return torch.relu(y + other.float()).to(x.dtype)
    return torch.relu(F.conv2d(x, weight, bias, stride, padding, dilation, groups) + other)


def _is_relu(node: fx.Node, modules: dict) -> bool:
    if node.op == "call_module":
        return type(modules[node.target]) is nn.ReLU
    if node.op in ("call_function", "call_method"):
        name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
        return name in _RELU_FUNCTIONS and len(node.args) == 1
    return False


def _rewritable_conv(node: fx.Node, modules: dict) -> bool:
    if node.op != "call_module":
        return False
    m = modules[node.target]
    return type(m) is nn.Conv2d and m.padding_mode == "zeros" and not isinstance(m.padding, str)


def _conv_args(gm: fx.GraphModule, node: fx.Node, m: nn.Conv2d):
    g = gm.graph
    with g.inserting_before(node):
        w = g.get_attr(f"{node.target}.weight")
        b = g.get_attr(f"{node.target}.bias") if m.bias is not None else None
    return w, b, list(m.padding), list(m.stride), list(m.dilation), m.groups


def _replace(gm: fx.GraphModule, dead: list, before: fx.Node, fn, args) -> None:
    """Insert ``fn(*args)`` before ``before``, give it the uses of ``dead[0]``, and erase ``dead``."""
    with gm.graph.inserting_before(before):
        new = gm.graph.call_function(fn, args)
    dead[0].replace_all_uses_with(new)
    for node in dead:
        gm.graph.erase_node(node)


def _fuse_pointwise(gm: fx.GraphModule) -> int:
    """Replace conv->relu and conv->add->relu by ``conv_relu`` / ``conv_add_relu`` and every other
    convolution by ``conv2d``. Returns how many were fused."""
    modules = dict(gm.named_modules())
    fused = 0
    for node in list(gm.graph.nodes):
        if not _rewritable_conv(node, modules):
            continue
        m = modules[node.target]
        w, b, pad, stride, dil, groups = _conv_args(gm, node, m)
        user = next(iter(node.users)) if len(node.users) == 1 else None
        if user is not None and _is_relu(user, modules):
            _replace(gm, [user, node], user, conv_relu, (node.args[0], w, b, pad, stride, dil, groups))
            fused += 1
            continue
        if user is not None and user.op == "call_function" and user.target in (operator.add, torch.add) \
                and len(user.args) == 2 and not user.kwargs and len(user.users) == 1 \
                and _is_relu(next(iter(user.users)), modules):
            relu = next(iter(user.users))
            other = user.args[1] if user.args[0] is node else user.args[0]
            if other is not node and isinstance(other, fx.Node):
                _replace(gm, [relu, user, node], relu, conv_add_relu,
                         (node.args[0], other, w, b, pad, stride, dil, groups))
                fused += 1
                continue
        _replace(gm, [node], node, conv2d, (node.args[0], w, b, pad, stride, dil, groups))
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
