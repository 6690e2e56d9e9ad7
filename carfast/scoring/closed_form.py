"""Recognise when a layer's ablations have a closed form (docs/design.md 3.4) and prepare its operands.

The closed form applies when the target has one consumer, either a Conv2d (groups 1, zero padding,
one input channel per filter) or a Linear (any feature block per filter; e.g. the classifier itself),
the consumer is followed by an elementwise epilogue of the form
``act(BN(z) + residual)`` (each part optional, in that order; act is ReLU or ReLU6; the residual a
value computed before the cut), and everything after the epilogue is affine up to the logits
(pooling, flatten, dropout in eval, Linear...). The affine tail's linear part is materialised once as
a matrix ``tail`` [classes, O, Ho, Wo] (conv) or [classes, O] (linear) by differentiating it (exact
for an affine map).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx, nn

from carfast.graph.catalog import classify
from carfast.graph.split import LayerGraph, fn_name, subgraph
from carfast.ops.closed_form_logits import ACTIVATIONS
from carfast.ops.consumer import ConvConsumer, LinearConsumer

__all__ = ["ClosedForm", "find_closed_form", "consumer_epilogue", "conv_consumer", "gathered_weight"]

_ADDS = (operator.add, operator.iadd, torch.add)


@dataclass
class ClosedForm:
    """The closed form of a layer's ablations, beyond the images: ``consumer`` (``ops.consumer.ConvConsumer`` or
    ``LinearConsumer``: the consumer and its epilogue), ``residual_index`` (which boundary value is the
    epilogue's residual, or None) and ``tail`` [classes, O, Ho, Wo] (conv) or [classes, O] (linear), the
    affine tail's linear part."""
    consumer: ConvConsumer | LinearConsumer
    residual_index: int | None
    tail: torch.Tensor

    @property
    def kind(self) -> str:
        """"conv" or "linear": the consumer's type."""
        return self.consumer.kind


def _bn_affine(bn: nn.modules.batchnorm._BatchNorm):
    if bn.running_mean is None or bn.running_var is None:
        return None
    inv = torch.rsqrt(bn.running_var + bn.eps)
    w = bn.weight if bn.weight is not None else torch.ones_like(inv)
    b = bn.bias if bn.bias is not None else torch.zeros_like(inv)
    scale = (w * inv).detach()
    return scale, (b - bn.running_mean * scale).detach()


def consumer_epilogue(lg: LayerGraph, modules: dict):
    """Walk ``BN? -> add(residual)? -> act?`` after the consumer. Returns (last node, parts, used nodes)."""
    cur = lg.consumers[0].node
    spec = lg.consumers[0].spec
    out_ch = spec.out_channels
    w = spec.weight
    scale, shift = torch.ones(out_ch, dtype=w.dtype, device=w.device), torch.zeros(out_ch, dtype=w.dtype,
                                                                                  device=w.device)
    residual, act, stage, used = None, 0, 0, []
    while len(cur.users) == 1:
        u = next(iter(cur.users))
        if stage < 1 and u.op == "call_module" and type(modules[u.target]) in (nn.BatchNorm1d, nn.BatchNorm2d) \
                and u.args == (cur,):
            parts = _bn_affine(modules[u.target])
            if parts is None:
                break
            scale, shift, stage = parts[0], parts[1], 1
        elif stage < 2 and u.op == "call_function" and u.target in _ADDS and len(u.args) == 2 and not u.kwargs:
            other = u.args[1] if u.args[0] is cur else u.args[0]
            if other is cur or other not in lg.boundary:
                break
            residual, stage = lg.boundary.index(other), 2
        elif stage < 3 and _activation(u, cur, modules) is not None:
            act, stage = _activation(u, cur, modules), 3
        else:
            break
        used.append(u)
        cur = u
    return cur, (scale, shift, residual, act), used


def _activation(u: fx.Node, cur: fx.Node, modules: dict):
    if u.args[:1] != (cur,):
        return None
    if u.op == "call_module":
        m = modules[u.target]
        return {nn.ReLU: ACTIVATIONS["relu"], nn.ReLU6: ACTIVATIONS["relu6"]}.get(type(m))
    if u.op in ("call_function", "call_method") and len(u.args) == 1:
        return {"relu": ACTIVATIONS["relu"], "relu_": ACTIVATIONS["relu"],
                "relu6": ACTIVATIONS["relu6"]}.get(fn_name(u))
    return None


def _tail_is_affine(lg: LayerGraph, y: fx.Node, tail_nodes) -> bool:
    """Whether the network after ``y`` is affine in ``y``, by what each op computes (the op catalogue's
    ``linear`` flag: pooling by averaging, ``mean`` / ``sum`` over dims, moves, Linear, dropout in eval...),
    not by how it is spelled; a product counts only when one factor does not depend on ``y``."""
    ops = {op.fx_node: op for op in lg.flow.graph.ops}
    depends = set(tail_nodes) | {y}
    for n in tail_nodes:
        if n.op == "get_attr" or n.op in ("call_function", "call_method") and "tensor_meta" not in n.meta:
            continue                     # a parameter, or a size computed from shapes
        if n.op not in ("call_module", "call_function", "call_method") or n not in ops:
            return False
        rule = classify(ops[n])
        if not rule.linear:
            return False
        if rule.combine == "mul" and sum(a in depends for a in n.all_input_nodes) > 1:
            return False                 # a product of two values that both depend on y
        if any(a not in depends and a.op != "get_attr" and "tensor_meta" in a.meta for a in n.all_input_nodes):
            return False                 # reads a value computed before the cut (not a constant of the tail)
    return True


def _tail_matrix(lg: LayerGraph, y: fx.Node, tail_nodes, y_shape) -> torch.Tensor:
    out = next(n for n in lg.gm.graph.nodes if n.op == "output")
    tail = subgraph(lg.gm, [(y, "y")], list(tail_nodes) + [out])
    w = lg.consumers[0].spec.weight
    y0 = torch.zeros((1,) + tuple(y_shape[1:]), dtype=w.dtype, device=w.device)
    with torch.enable_grad():
        jac = torch.autograd.functional.jacobian(lambda v: tail(v), y0, vectorize=True)
    return jac.reshape((jac.shape[1],) + tuple(y_shape[1:])).detach().contiguous()


def find_closed_form(lg: LayerGraph) -> ClosedForm | None:
    """The closed-form operands for ``lg``, or None where the closed form does not apply."""
    if len(lg.consumers) != 1 or lg.masked:
        return None
    c = lg.consumers[0]
    m = c.spec
    if c.width is None or len(c.index) != c.width * lg.num_filters:
        return None
    if m.kind == "conv" and (m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str) or c.width != 1):
        return None
    modules = dict(lg.gm.named_modules())
    y, (scale, shift, residual, act), used = consumer_epilogue(lg, modules)
    tail_nodes = [n for n in lg.changed if n not in used and n.op != "output"]
    if not _tail_is_affine(lg, y, tail_nodes):
        return None
    tail = _tail_matrix(lg, y, tail_nodes, y.meta["tensor_meta"].shape)
    weight = gathered_weight(c)
    if m.kind == "linear":
        return ClosedForm(LinearConsumer(weight, c.width, scale.contiguous(), shift.contiguous(), act), residual, tail)
    return ClosedForm(conv_consumer(weight, scale, shift, act, m), residual, tail)


def conv_consumer(weight, scale, shift, act: int, m) -> ConvConsumer:
    """The ``ConvConsumer`` of a consumer conv whose settings ``m`` holds (a ``graph.LayerSpec``)."""
    return ConvConsumer(weight, scale.contiguous(), shift.contiguous(), act, tuple(m.stride), tuple(m.padding),
                        tuple(m.dilation))


def gathered_weight(c) -> torch.Tensor:
    """The consumer's weight over its gathered input (unit by unit, ``graph.Consumer.index``), contiguous."""
    w = c.spec.weight.detach()
    return (w if c.identity() else w.index_select(1, c.index.to(w.device))).contiguous()
