"""Coupling groups: the layers whose output channels can only be removed together, and what each loses.

A channel that enters a residual add cannot leave one layer alone: the add's output carries it, the
next block reads and adds to it, and so on. Removing channel i of the group removes output i from every
*producer* (the stem conv, every block's second conv, a 1x1 shortcut conv), entry i from every
BatchNorm on the stream, input i from every *reader* (each block's first conv, the classifier after
pooling), and follows the stream through depthwise convs, norms and squeeze-and-excitation gates, so
channel i of the stream is gone wherever it is read, exactly as the physically smaller network computes.
Where the stream pairs channels (a Ghost module's cheap depthwise conv makes channel C + j from channel
j), the pair is one channel of the group. The channel-flow analysis (``carfast.graph``) finds all this.

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

``find_group(model, name, example)`` returns the ``CouplingGroup`` of layer ``name``; ``members`` lists
every layer it touches and how the group's channels map onto it. A layer coupled with no other is a
group of one producer (its readers are its consumers).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from carfast.graph import Flow, analyze
from carfast.graph.checks import profile, unit_axis
from carfast.graph.registry import layer_filters
from carfast.graph.relations import key_meta
from carfast.graph.rule import channel_map_of

__all__ = ["GroupMember", "CouplingGroup", "find_group", "members_of"]


@dataclass
class GroupMember:
    """One layer of a coupling group and how the group's channels map onto it.

    role: "output" (a producer: group channel i is its output channel ``channels[i]``), "batchnorm" /
    "norm" / "param" (per-channel tensors of a BatchNorm, a LayerNorm or GroupNorm, another module:
    entry ``channels[i]``), "depthwise" (a depthwise conv on the stream: its group ``channels[i]``),
    "input" (a reader Conv2d / Linear: group channel i is its input slice [channels[i] * width,
    (channels[i] + 1) * width), width > 1 for a Linear after a flatten), "shortcut_in" (a channel-map
    shortcut reading the stream: group channel i moves to its output channel ``channels[i]`` in the next
    stream, -1 where it is dropped), "shortcut_out" (a channel-map shortcut writing into the stream:
    group channel j receives its input channel ``channels[j]``, -1 for none). Where a group channel spans
    several indices of a member (paired channels), ``channels[i]`` is the list of them.
    """
    layer: str
    role: str
    channels: list
    width: int = 1

    def to_dict(self) -> dict:
        return {"layer": self.layer, "role": self.role, "channels": list(self.channels), "width": self.width}


@dataclass
class CouplingGroup:
    """A coupling group (see the module docstring)."""
    layer: str                               # the layer asked for
    num_channels: int
    members: list[GroupMember]
    coupled: bool                            # whether other layers' channels are tied to the layer's
    flow: Flow = field(repr=False)

    @property
    def producers(self) -> list[str]:
        return [m.layer for m in self.members if m.role == "output"]


def _one(idx: list[int]):
    return idx[0] if len(idx) == 1 else list(idx)


def _blocks(owned: list) -> tuple[list, int]:
    """(channels, width): owned index lists as aligned blocks of one width (a Linear after a flatten)."""
    widths = {len(o) for o in owned if len(o)}
    if len(widths) == 1:
        w = widths.pop()
        if w > 1 and all(len(o) == 0 or (int(o[0]) % w == 0 and torch.equal(o, torch.arange(int(o[0]), int(o[0]) + w)))
                         for o in owned):
            return [int(o[0]) // w if len(o) else -1 for o in owned], w
    return [_one(o.tolist()) if len(o) else -1 for o in owned], 1


def _channel_map(op) -> dict:
    """{input channel: output channel} of a channel-map op (``rule.channel_map_of``)."""
    _, _, src, dst = channel_map_of(op)
    return dict(zip(src, dst))


def members_of(flow: Flow) -> list[GroupMember]:
    """The members of ``flow``'s group in the order the forward meets them."""
    out, where = [], {}
    w = flow.walk

    def add(op, m):
        if not any(o.layer == m.layer and o.role == m.role for o in out):
            out.append(m)
            where[id(m)] = op.index

    for p in flow.producers:
        if p.kind == "channel_map":
            inverse = {d: s for s, d in _channel_map(p.op).items()}
            prof = p.rows
            slots = [int(r[0]) if len(r) else -1 for r in prof]
            add(p.op, GroupMember(p.op.name, "shortcut_out", [inverse.get(s, -1) if s >= 0 else -1 for s in slots]))
        else:
            add(p.op, GroupMember(p.op.name if p.op.kind == "module" else p.op.label, "output",
                                  [_one(r.tolist()) for r in p.rows]))
    for r in flow.readers:
        if r.kind == "channel_map":
            cmap = _channel_map(r.op)
            add(r.op, GroupMember(r.op.name, "shortcut_in", [cmap.get(int(o[0]), -1) if len(o) else -1
                                                              for o in r.owned]))
        elif r.kind != "norm":
            channels, width = _blocks(r.owned)
            add(r.op, GroupMember(r.op.name if r.op.kind == "module" else r.op.label, "input", channels, width))
    for op in w.touched:
        if w.rules[op].kind == "depthwise" and op is not w.target:
            prof = profile(w.of(op.args[0]), 1)
            add(op, GroupMember(op.name, "depthwise", [_one((prof == u + 1).nonzero().flatten().tolist())
                                                       for u in range(flow.num_units)]))
    for key, codes in w.codes.items():
        if key[0] != "param" and key[0].kind != "param":
            continue
        path, attr = (key[1], key[2]) if key[0] == "param" else (key[0].module, key[0].target)
        module = flow.modules[path]
        if layer_filters(module) is not None:
            continue                       # their rows and columns are the producers' and readers' above
        c = codes.view(*key_meta(key, flow.modules).shape)
        dim = unit_axis(c, 0)
        prof = profile(c, dim)
        role = "batchnorm" if isinstance(module, nn.modules.batchnorm._BatchNorm) else \
            "norm" if isinstance(module, (nn.LayerNorm, nn.GroupNorm)) else "param"
        op = key[0] if key[0] != "param" else next((o for o in flow.graph.ops if o.name == path), w.target)
        add(op, GroupMember(path, role, [_one((prof == u + 1).nonzero().flatten().tolist())
                                         for u in range(flow.num_units)]))
    out.sort(key=lambda m: where[id(m)])
    return out


def find_group(model: nn.Module, name: str, example: torch.Tensor, fn: str = "score_group") -> CouplingGroup:
    """The coupling group of layer ``name`` (a Conv2d or Linear called once); ``example`` is [1, ...]."""
    flow = analyze(model, name, example, fn, group=True)
    return CouplingGroup(name, flow.num_units, members_of(flow), flow.coupled, flow)
