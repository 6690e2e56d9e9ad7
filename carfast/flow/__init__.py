"""The channel-flow analysis: where removing a filter (or a coupling group's channel) reaches.

One walker (``walker.py``) over one op catalogue (``catalog.py``), fed by two front ends (``ir.py``: a
torch.fx trace, or one recorded forward pass for models fx cannot trace). ``analyze`` (``flow.py``)
gives the readers where removal is applied, the producers and per-channel tensors surgery deletes
from, and refuses, naming the op, what cannot be removed on its own or at all (``checks.py``).
Scoring, surgery, masks and the baseline criteria all read it.
"""
from .flow import Flow, FlowError, Producer, Reader, analyze, build_graph, find_target
from .ir import FlowGraph, Op, TensorMeta, TraceError, from_fx, from_recording, is_channel_map, is_leaf_module

__all__ = ["Flow", "FlowError", "Producer", "Reader", "analyze", "build_graph", "find_target", "FlowGraph", "Op",
           "TensorMeta", "TraceError", "from_fx", "from_recording", "is_channel_map", "is_leaf_module"]
