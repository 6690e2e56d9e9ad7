"""Split a suffix at the consumer's epilogue, for the ``ablated_consumer`` op (GPU backends).

When the target's only consumer is a Conv2d (groups 1, zero padding, one input channel per filter)
followed by an elementwise epilogue ``act(BN(z) + residual)`` (each part optional), the ablated
consumer output after its epilogue comes from one fused op (``ops/ablated_consumer.py``) and only the
network after the epilogue (``post``) runs per pair. ``post`` takes (y, B_1..B_b): the epilogue's
output and the boundary values, like the suffix takes (Z, B).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from carfast.graph.split import LayerGraph, subgraph
from carfast.ops.consumer import ConvConsumer
from carfast.scoring.closed_form import consumer_epilogue, conv_consumer, gathered_weight

__all__ = ["FusedConsumer", "find_fused_consumer"]


@dataclass
class FusedConsumer:
    """The fused-consumer split: ``consumer`` (``ops.consumer.ConvConsumer``, the conv and its epilogue, for
    ``ops.ablated_consumer``), ``residual_index`` (which boundary value is the epilogue's residual, or None)
    and ``post``: (y, B_1..B_b) -> logits, the network after the epilogue."""
    consumer: ConvConsumer
    residual_index: int | None
    post: fx.GraphModule


def find_fused_consumer(lg: LayerGraph) -> FusedConsumer | None:
    """The fused-consumer split for ``lg``, or None where it does not apply."""
    if len(lg.consumers) != 1 or lg.masked:
        return None
    c = lg.consumers[0]
    m = c.spec
    if m.kind != "conv" or m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str) \
            or c.width != 1 or len(c.index) != lg.num_filters:
        return None
    y, (scale, shift, residual, act), used = consumer_epilogue(lg, dict(lg.gm.named_modules()))
    out = next(n for n in lg.gm.graph.nodes if n.op == "output")
    body = [n for n in lg.changed if n not in used and n.op != "output"] + [out]
    inputs = [(y, "y")] + [(b, f"b{i}") for i, b in enumerate(lg.boundary)]
    post = subgraph(lg.gm, inputs, body)
    return FusedConsumer(conv_consumer(gathered_weight(c), scale, shift, act, m), residual, post)
