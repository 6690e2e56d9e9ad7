"""Graph analysis: where removing a filter (or a coupling group's channel) reaches, and the network
split where that removal takes effect.

The channel-flow analysis is one walker (``walker.py``) over one op catalogue (``catalog.py``), fed by
two front ends (``ir.py``: a torch.fx trace, or one recorded forward pass for models fx cannot trace);
``analyze`` (``flow.py``) gives the readers where removal is applied and the producers and per-channel
tensors surgery deletes from, and refuses, naming the op, what cannot be removed (``checks.py``).
``apply.py`` and ``masking.py`` apply a removal during a run; ``split.py`` cuts an fx graph into the
cached prefix and the suffix scoring runs per removal; ``groups.py`` lists a coupling group's members,
``layers.py`` what carfast can do with every layer, and ``target.py`` reads a target (a layer or
``Group``). ``docs/channel_flow.md`` explains it all.
"""
from carfast.graph.flow import Flow, FlowError, Producer, Reader, analyze, analyze_units, build_graph, find_target
from carfast.graph.groups import CouplingGroup, GroupMember, find_group, members_of
from carfast.graph.ir import (
                              FlowGraph,
                              Op,
                              TensorMeta,
                              TraceError,
                              from_fx,
                              from_recording,
                              is_channel_map,
                              is_leaf_module,
)
from carfast.graph.layers import LayerInfo, layers
from carfast.graph.split import LayerGraph, split, target_num_filters, trace
from carfast.graph.target import Group, resolve_target, target_spec

__all__ = ["Flow", "FlowError", "Producer", "Reader", "analyze", "analyze_units", "build_graph", "find_target",
           "FlowGraph", "Op", "TensorMeta", "TraceError", "from_fx", "from_recording", "is_channel_map",
           "is_leaf_module", "LayerGraph", "split", "target_num_filters", "trace", "CouplingGroup", "GroupMember",
           "find_group", "members_of", "LayerInfo", "layers", "Group", "resolve_target", "target_spec"]
