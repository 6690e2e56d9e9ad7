"""Coupling groups: the layers whose output channels are one channel of a residual stream.

A channel that enters a residual add cannot leave one layer alone: the add's output carries it, the
next block reads and adds to it, and so on. Removing channel i of the group removes output i from every
*producer* (the stem conv, every block's second conv, a 1x1 shortcut conv), entry i from every
BatchNorm on the stream, and input i from every *reader* (each block's first conv, the classifier after
pooling), so channel i of the stream is zero wherever it is read, exactly as the physically smaller
network computes.

Channel-padding shortcuts (the CIFAR ResNets' parameter-free "option A": every second pixel, channels
zero-padded from C to C + 2p) join two stages. They do not couple the stages: stage s+1's channel
c + p is the sum of its own producers' channel c + p and the shortcut's copy of stage s's channel c, so
removing stage s's channel c leaves that channel of stage s+1 alive (it only loses the copy), and
removing stage s+1's channel c + p drops the copy without touching stage s. carfast's convention is
therefore **one group per stage**; the shortcut is a *reader* of the stage it comes from (its input
channel i moves to output channel i + p of the next stage's stream) and an *inlet* of the stage it goes
to. Torch-Pruning's dependency graph, by contrast, treats the padding as an element-wise op and merges
all stages into one group with mismatched channel indices; ``carfast.integrations.torch_pruning`` gives
it a pruner for the shortcut so its groups match these.

``find_group(gm, name)`` walks a traced network (``graph.trace``) from layer ``name`` and returns a
``CouplingGroup``: the *stream* nodes (every value whose dim 1 is the group's channels; scoring zeroes
channel i of each of them) and the ``members`` with their channel mappings. A layer that enters no add
is a group of one producer (its readers are its consumers).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

from torch import fx, nn

from .graph import fn_name
from .ops_catalog import (CHAIN_FUNCTIONS, CHAIN_MODULES, FLATTEN_FUNCTIONS, SHAPE_QUERIES, classify_module,
                          is_channel_map, is_depthwise)

__all__ = ["GroupMember", "CouplingGroup", "find_group"]

_ADDS = frozenset({"add", "add_", "iadd", "__add__", "__iadd__", "__radd__"})


@dataclass
class GroupMember:
    """One layer of a coupling group and how the group's channels map onto it.

    role: "output" (a producer: group channel i is its output channel ``channels[i]``), "batchnorm" (a
    BatchNorm on the stream: entry ``channels[i]``), "input" (a reader Conv2d / Linear: group channel i is
    its input slice [channels[i] * width, (channels[i] + 1) * width), width > 1 for a Linear after a
    flatten), "shortcut_in" (a channel-map shortcut reading the stream: group channel i moves to its output
    channel ``channels[i]`` in the next stream, -1 where it is dropped), "shortcut_out" (a channel-map
    shortcut writing into the stream: group channel j receives its input channel ``channels[j]``, -1 for
    none).
    """
    layer: str
    role: str
    channels: list[int]
    width: int = 1

    def to_dict(self) -> dict:
        return {"layer": self.layer, "role": self.role, "channels": list(self.channels), "width": self.width}


@dataclass
class CouplingGroup:
    """A coupling group found in a traced network (see the module docstring)."""
    layer: str                               # the layer asked for
    num_channels: int
    members: list[GroupMember]
    stream: list[fx.Node] = field(repr=False)   # values whose dim 1 is the group's channels, graph order
    gm: fx.GraphModule = field(repr=False)

    @property
    def producers(self) -> list[str]:
        return [m.layer for m in self.members if m.role == "output"]

    @property
    def coupled(self) -> bool:
        """Whether the channels enter a residual add (more than the one producer asked for)."""
        return len(self.producers) > 1 or any(m.role == "shortcut_out" for m in self.members)


def _meta_shape(node) -> tuple | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _spatial_slice(node: fx.Node) -> bool:
    """``x[:, :, a:b:s, ...]``: a getitem that slices only dims 2.. (keeps every channel, in order)."""
    if node.op != "call_function" or node.target is not operator.getitem or len(node.args) != 2:
        return False
    idx = node.args[1]
    return isinstance(idx, tuple) and len(idx) >= 2 and all(isinstance(i, slice) for i in idx) \
        and idx[0] == slice(None) and idx[1] == slice(None)


def _channel_pad(node: fx.Node) -> int | None:
    """The channel offset p of ``F.pad(x, (.., .., p, q))`` with zero padding on dim 1 of a 4-D tensor."""
    if node.op != "call_function" or fn_name(node) != "pad":
        return None
    pads = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
    mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
    value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", None)
    shape = _meta_shape(node.args[0])
    if not isinstance(pads, (tuple, list)) or len(pads) != 6 or shape is None or len(shape) != 4 \
            or mode != "constant" or value not in (None, 0, 0.0) or any(not isinstance(p, int) for p in pads):
        return None
    return pads[4]


class _Walker:
    """The search of ``find_group``: grows the stream from the target forward and back through adds."""

    def __init__(self, gm: fx.GraphModule, name: str, fn: str):
        self.gm, self.name, self.fn = gm, name, fn
        self.modules = dict(gm.named_modules())
        self.stream: dict[fx.Node, None] = {}
        self.members: list[GroupMember] = []
        self.work: list[fx.Node] = []
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}
        self.where: dict[int, int] = {}       # id(member) -> graph position of its node
        self.C = 0

    def fail(self, what: str):
        raise ValueError(f"{self.fn}: layer {self.name!r}: {what}")

    def label(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return node.target
        stack = node.meta.get("nn_module_stack") or {}
        return next(reversed(stack)) if stack else node.name

    def ident(self) -> list[int]:
        return list(range(self.C))

    def join(self, node: fx.Node) -> None:
        if node not in self.stream:
            shape = _meta_shape(node)
            if shape is None or len(shape) < 2 or shape[1] != self.C:
                self.fail(f"{node.name!r} on its residual stream has shape {shape}, not [N, {self.C}, ...]; the "
                          "group's channels must keep their count along the stream")
            self.stream[node] = None
            self.work.append(node)

    def add_member(self, node, role, channels, width=1):
        label = self.label(node)
        if not any(m.layer == label and m.role == role for m in self.members):
            self.members.append(GroupMember(label, role, channels, width))
            self.where[id(self.members[-1])] = self.order[node]

    def producer(self, node: fx.Node) -> None:
        if node in self.stream:
            return
        m = self.modules[node.target]
        if is_depthwise(m) or (isinstance(m, nn.Conv2d) and m.groups > 1):
            self.fail(f"its residual stream is written by {node.target!r}, a grouped conv (groups={m.groups}); "
                      "carfast's group surgery handles plain Conv2d and Linear producers")
        self.add_member(node, "output", self.ident())
        self.join(node)

    def run(self, target: fx.Node, num: int) -> None:
        self.C = num
        self.producer(target)
        while self.work:
            v = self.work.pop()
            for u in list(v.users):
                self.forward(v, u)
            if v.op in ("call_function", "call_method") and fn_name(v) in _ADDS:
                for a in v.all_input_nodes:
                    self.backward(a)

    def forward(self, v: fx.Node, u: fx.Node) -> None:
        """``u`` reads stream value ``v``."""
        if u in self.stream:
            return
        if u.op == "output":
            self.fail(f"its channels reach the model's output through {v.name!r} without a Conv2d or Linear")
        if u.op == "call_module":
            m = self.modules[u.target]
            if is_channel_map(m):
                n_in, _, src, dst = m.carfast_channel_map()
                where = dict(zip(src, dst))
                self.add_member(u, "shortcut_in", [where.get(c, -1) for c in range(n_in)])
                return
            if is_depthwise(m):
                self.fail(f"its residual stream passes {u.target!r}, a depthwise conv; the group analysis follows "
                          "per-channel ops without parameters of their own besides BatchNorm")
            kind, info = classify_module(m, _meta_shape(v), _meta_shape(u))
            if kind == "chain" and info == 1:
                if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                    self.add_member(u, "batchnorm", self.ident())
                self.join(u)
                return
            if kind == "chain":              # a flatten: the readers after it own blocks of features
                self.tail(u, info)
                return
            if kind == "consumer":
                self.reader(v, u, 1)
                return
            self.fail(f"its channels reach {u.target!r} ({type(m).__name__}), which the group analysis does not "
                      "follow; it follows per-channel ops, residual adds, channel-padding shortcuts and flatten "
                      "into Conv2d/Linear readers")
        name = fn_name(u)
        if name in SHAPE_QUERIES:
            return
        if _spatial_slice(u):
            self.join(u)
            return
        pad = _channel_pad(u)
        if pad is not None:
            self.add_member(u, "shortcut_in", [c + pad for c in range(self.C)])
            return
        if name in _ADDS:
            if not all(isinstance(a, fx.Node) or isinstance(a, (int, float)) for a in u.args[:2]):
                self.fail(f"{u.name!r} adds something carfast cannot follow")
            self.join(u)
            return
        if name in CHAIN_FUNCTIONS and u.args[:1] == (v,):
            self.join(u)
            return
        if name in FLATTEN_FUNCTIONS:
            shape_in, shape_out = _meta_shape(v), _meta_shape(u)
            if shape_in and shape_out and len(shape_out) == 2 and shape_out[1] == self.C * _prod(shape_in[2:]):
                self.tail(u, _prod(shape_in[2:]))
                return
        self.fail(f"its channels reach {u.name!r} ({name}), which the group analysis does not follow; it follows "
                  "per-channel ops, residual adds, channel-padding shortcuts and flatten into Conv2d/Linear readers")

    def reader(self, v: fx.Node, u: fx.Node, width: int) -> None:
        if u.args[:1] != (v,):
            self.fail(f"its channels reach {u.target!r} as other than its input")
        m = self.modules[u.target]
        if isinstance(m, nn.Conv2d) and m.groups > 1:
            self.fail(f"its residual stream is read by {u.target!r}, a grouped conv (groups={m.groups}); the group "
                      "analysis handles plain Conv2d and Linear readers")
        self.add_member(u, "input", self.ident(), width)

    def tail(self, node: fx.Node, width: int) -> None:
        """After a flatten (channel i owns ``width`` features): only chain ops, then Linear readers."""
        for u in node.users:
            if u.op == "call_module" and isinstance(self.modules[u.target], nn.Linear):
                self.reader(node, u, width)
            elif u.op == "call_module" and isinstance(self.modules[u.target], CHAIN_MODULES) or \
                    u.op != "call_module" and fn_name(u) in CHAIN_FUNCTIONS:
                self.tail(u, width)
            elif u.op == "call_module" or fn_name(u) not in SHAPE_QUERIES:
                self.fail(f"after flattening, its channels reach {u.name!r}; the group analysis follows them only "
                          "into Linear readers")

    def backward(self, a: fx.Node) -> None:
        """An input of a stream add: walk back through per-channel ops to a producer, a shortcut or the stream."""
        path, node = [], a
        while node not in self.stream:
            if node.op == "call_module":
                m = self.modules[node.target]
                if isinstance(m, (nn.Conv2d, nn.Linear)) and not is_depthwise(m):
                    self.producer(node)
                    break
                if is_channel_map(m):
                    n_in, n_out, src, dst = m.carfast_channel_map()
                    where = dict(zip(dst, src))
                    self.add_member(node, "shortcut_out", [where.get(c, -1) for c in range(n_out)])
                    self.join(node)
                    break
                if isinstance(m, CHAIN_MODULES):
                    if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                        self.add_member(node, "batchnorm", self.ident())
                    path.append(node)
                    node = node.args[0]
                    continue
            elif node.op in ("call_function", "call_method"):
                if fn_name(node) in _ADDS:      # an earlier add of the same stream
                    self.join(node)
                    break
                pad = _channel_pad(node)
                if pad is not None:
                    n_in = _meta_shape(node.args[0])[1]
                    self.add_member(node, "shortcut_out", [c - pad if 0 <= c - pad < n_in else -1
                                                           for c in range(self.C)])
                    self.join(node)
                    break
                if fn_name(node) in CHAIN_FUNCTIONS or _spatial_slice(node):
                    path.append(node)
                    node = node.args[0]
                    continue
            self.fail(f"a residual add on its stream also reads {self.label(node)!r} ({node.op} {node.target}), "
                      "which is neither a Conv2d/Linear producer, nor a per-channel op on one, nor a "
                      "channel-padding shortcut")
        for n in path:
            self.join(n)


def _prod(dims) -> int:
    out = 1
    for d in dims:
        out *= int(d)
    return out


def find_group(gm: fx.GraphModule, name: str, fn: str = "score_group") -> CouplingGroup:
    """The coupling group of layer ``name`` (a Conv2d or Linear called once) in ``gm`` (``graph.trace``)."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == name]
    if len(nodes) != 1:
        raise ValueError(f"{fn}: layer {name!r} is called {len(nodes)} times in forward; a group member must run "
                         "exactly once")
    m = gm.get_submodule(name)
    num = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
    walker = _Walker(gm, name, fn)
    walker.run(nodes[0], num)
    order = walker.order
    walker.members.sort(key=lambda m: walker.where[id(m)])     # graph order, whichever member was named
    for member in walker.members:
        if member.role in ("output", "input"):
            calls = sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == member.layer)
            if calls != 1:
                raise ValueError(f"{fn}: layer {name!r}: group member {member.layer!r} is called {calls} times in "
                                 "forward (a shared module); give each use its own module")
    stream = sorted(walker.stream, key=order.__getitem__)
    return CouplingGroup(name, num, walker.members, stream, gm)
