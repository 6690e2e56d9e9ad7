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

The rules themselves are tables: ``registry.HANDLERS`` (one handler per module type, found along the
class's MRO: carfast's own in ``module_rules.py``, users' through ``carfast.register_module``) and
``function_rules.RULES`` (one per canonical function name); ``rule.py`` holds ``Rule``.
"""
from __future__ import annotations

from torch.utils._pytree import tree_flatten

from carfast.graph.function_rules import function_rule
from carfast.graph.ir import Op, TensorMeta
from carfast.graph.module_rules import module_rule
from carfast.graph.rule import Rule

__all__ = ["Rule", "classify", "data_args"]


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


def classify(op: Op) -> Rule:
    """The rule of ``op`` (a module or function call); ``ignore`` when it returns no tensor."""
    if not any(isinstance(t, TensorMeta) for t in tree_flatten(op.meta)[0]):
        return Rule("ignore")
    if op.kind == "module":
        return module_rule(op)
    if op.kind == "function":
        return function_rule(op)
    return Rule("ignore")
