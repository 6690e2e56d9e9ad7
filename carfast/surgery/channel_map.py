"""Channel maps written as functions: surgery rewrites the traced call into a ``ChannelMap`` module.

A parameter-free step that moves channels from one residual stream into the next, written as a
function call with constant arguments (the classic CIFAR ResNet's option-A shortcut,
``F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, p, p))`` in a lambda or in ``forward``), has nothing to slice:
its channel counts live in the code. When a removal reaches such a call, surgery works on the model's
torch.fx trace instead of the model's own ``forward``:

- ``rewrite_calls(work, graph, ops, fn)`` replaces each call by a ``ChannelMap`` module holding the same
  map (input channel ``src[i]`` lands at output channel ``dst[i]``, the other outputs are zero), added to
  ``work`` beside the module whose forward made the call, in the fx graph and in carfast's ops alike, so
  the ordinary slicer remaps it (``slicers.remap_channel_map``);
- ``traced_model(work, graph)`` is the result: a ``torch.fx.GraphModule`` of ``work`` running that graph,
  with the original's module names, parameters, training flags and ``carfast_arch``, and
  ``carfast_rewrites`` ([[fx node name, module path], ...]) recording which calls became modules, so
  ``pruned_io`` can rebuild it from a fresh trace of the unpruned network (``rebuild_rewrites``). Pruning
  it again reuses its graph (``flow.build_graph``): node names stay those of the first trace.
"""
from __future__ import annotations

import copy

from torch import fx, nn

from carfast.graph.ir import FlowGraph, Op, trace_fx
from carfast.graph.rule import channel_map_of
from carfast.models.channel_map import ChannelMap

__all__ = ["ChannelMap", "RewrittenModel", "rewrite_calls", "traced_model", "rebuild_rewrites"]


class RewrittenModel(fx.GraphModule):
    """A traced network whose functional channel maps surgery made ``ChannelMap`` modules: a
    ``torch.fx.GraphModule`` that keeps ``carfast_rewrites`` and ``carfast_arch`` through ``copy.deepcopy``
    (a plain GraphModule's copy drops attributes it does not know)."""

    _KEPT = ("carfast_rewrites", "carfast_arch")

    def __deepcopy__(self, memo):
        res = super().__deepcopy__(memo)
        for attr in self._KEPT:
            if attr in self.__dict__:
                setattr(res, attr, copy.deepcopy(self.__dict__[attr], memo))
        return res


def _put(root: nn.Module, target: str, module: nn.Module) -> None:
    """Add ``module`` to ``root`` at path ``target``, making plain modules where the path is missing."""
    parent = root
    *scope, name = target.split(".")
    for part in scope:
        if not hasattr(parent, part):
            parent.add_module(part, nn.Module())
        parent = getattr(parent, part)
    parent.add_module(name, module)


def _free_path(root: nn.Module, scope: str, base: str) -> str:
    """``{scope}.{base}_map``, with underscores added until no attribute of that name exists."""
    try:
        parent = root.get_submodule(scope)
    except AttributeError:
        parent = None
    name = f"{base}_map"
    while parent is not None and hasattr(parent, name):
        name += "_"
    return f"{scope}.{name}" if scope else name


def _replace(graph: fx.Graph, node: fx.Node, target: str) -> fx.Node:
    """Put a call of module ``target`` on ``node``'s data input where ``node`` was."""
    with graph.inserting_before(node):
        new = graph.call_module(target, (node.args[0],))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    return new


def rewrite_calls(work: nn.Module, graph: FlowGraph, ops: list[Op], fn: str) -> list[list[str]]:
    """Turn each functional channel-map call in ``ops`` into a ``ChannelMap`` module of ``work``, in place
    (the module is added to ``work``; the fx node and carfast's op become calls of it). Returns the
    rewrites, [[fx node name, module path], ...]."""
    if graph.gm is None:
        raise ValueError(f"{fn}: the channels pass {ops[0].label}, a channel padding written as a function, and "
                         "torch.fx cannot trace the model, so surgery cannot rewrite that call; make it a module "
                         "with carfast_channel_map() and set_channel_map() (e.g. carfast.models.OptionAShortcut) "
                         "or make the forward traceable")
    done = []
    for op in ops:
        module = ChannelMap(*channel_map_of(op))
        target = _free_path(work, op.module, op.fx_node.name)
        _put(work, target, module)
        if graph.gm is not work:
            graph.gm.add_submodule(target, module)      # the graph's own module, which the node calls
        done.append([op.fx_node.name, target])
        op.fx_node = _replace(graph.gm.graph, op.fx_node, target)
        op.kind, op.target, op.name, op.module = "module", module, target, target
        op.args, op.kwargs, op.method = (op.args[0],), {}, False
    return done


def _copy_flags(gm: fx.GraphModule, model: nn.Module) -> None:
    """Each module of ``gm`` in ``model``'s training mode (the modules it shares keep theirs)."""
    flags = {name: m.training for name, m in model.named_modules()}
    for name, m in gm.named_modules():
        m.training = flags.get(name, model.training)


def _finish(gm: fx.GraphModule, model: nn.Module, rewrites: list) -> fx.GraphModule:
    """``gm`` with ``model``'s own module tree (its container classes, and its modules the graph does not
    call: the state dict keeps the original's keys), flags, ``carfast_arch`` and the rewrites."""
    if gm is not model:
        for name, child in model.named_children():
            gm.add_module(name, child)
    gm.recompile()
    _copy_flags(gm, model)
    if hasattr(model, "carfast_arch"):
        gm.carfast_arch = model.carfast_arch
    gm.carfast_rewrites = [list(r) for r in rewrites]
    return gm


def traced_model(work: nn.Module, graph: FlowGraph, rewrites: list) -> fx.GraphModule:
    """The GraphModule of ``work`` (sliced) running ``graph``'s rewritten fx graph (module docstring);
    ``rewrites`` are ``rewrite_calls``' results, added to those ``work`` already carries."""
    gm = graph.gm if graph.gm is work else RewrittenModel(work, graph.gm.graph, type(work).__name__)
    return _finish(gm, work, list(getattr(work, "carfast_rewrites", [])) + rewrites)


def rebuild_rewrites(model: nn.Module, rewrites: list, fn: str) -> fx.GraphModule:
    """``model`` (unpruned) traced, with the calls ``rewrites`` names turned into (unsized) ``ChannelMap``
    modules: the skeleton ``pruned_io`` gives the saved sizes and weights."""
    traced = trace_fx(model)
    gm = RewrittenModel(traced, traced.graph, type(model).__name__)
    nodes = {n.name: n for n in gm.graph.nodes}
    for node_name, target in rewrites:
        node = nodes.get(node_name)
        if node is None or node.op != "call_function":
            raise ValueError(f"{fn}: the file rewrites the call {node_name!r} of the traced forward, which the model "
                             "passed has not; pass model=, an unpruned instance of the architecture that was saved")
        module = ChannelMap(0, 0, [], [])
        _put(model, target, module)
        gm.add_submodule(target, module)
        _replace(gm.graph, node, target)
    return _finish(gm, model, rewrites)

