"""The channel-flow walker: where the channels of a layer go, and what else they are tied to.

Every output channel of the target layer starts as its own *slot* (a code 1..C written on each position
of the layer's output). Codes spread along the relations of ``relations.py`` in both directions until
nothing changes: forward through per-channel ops, moves, depthwise convs and normalisers, and back into
the other operands of an add or a mul, so a residual add reaches the stream's other producers and a
squeeze-and-excitation gate reaches the conv that makes the gate. Where two different slots meet at
one position (a depthwise conv pairing two channels of one residual stream, a sum over a split
attention's radix) they become one *unit* (union-find): removing a unit removes all its positions.
Conv2d / Linear calls stop the spread: one reading coded positions is a *reader* (a consumer, where
removal is applied), one whose output got codes is another *producer* of the group.

``walk(graph, target)`` returns the ``Walk``: codes of every value reached (canonical: 0 none, u + 1
unit u), the units of the target's channels, and the ops touched by rule. ``flow.py`` turns it into
readers, members and checks.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from carfast.errors import UnitMerge
from carfast.graph.catalog import Rule, classify
from carfast.graph.ir import FlowGraph, Op
from carfast.graph.relations import Relation, build_relations, key_meta

__all__ = ["Walk", "walk", "UnitMerge"]


@dataclass
class Walk:
    graph: FlowGraph
    target: Op
    codes: dict                      # value key -> [numel] int64 (0 none, u + 1 unit u)
    unit_of: torch.Tensor            # [C] int64: the unit of each of the target's channels
    rules: dict                      # op -> Rule, for every op touched
    relations: list = field(repr=False, default_factory=list)
    touched: list = field(default_factory=list)     # ops reading or making coded values, graph order

    @property
    def num_units(self) -> int:
        return int(self.unit_of.max()) + 1 if self.unit_of.numel() else 0

    def of(self, op: Op, i=None) -> torch.Tensor | None:
        """The codes of ``op``'s tensor (element ``i`` of a tuple), shaped like it; None if not reached."""
        c = self.codes.get((op, i))
        return None if c is None else c.view(*key_meta((op, i), {}).shape)


class _State:
    def __init__(self, graph: FlowGraph, modules: dict, allow_merge: bool):
        self.graph, self.modules, self.allow_merge = graph, modules, allow_merge
        self.codes: dict = {}
        self.rules: dict = {}
        self.rels_of: dict = {}       # key -> [Relation]
        self.built: set = set()
        self.parent = list(range(1))  # union-find over slots; 0 is "no channel"
        self.queue: list = []
        self.relations: list = []

    def rule(self, op: Op) -> Rule:
        if op not in self.rules:
            self.rules[op] = classify(op)
        return self.rules[op]

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def ensure(self, op: Op) -> None:
        """Build the relations of ``op`` once and index them by the values they touch."""
        if op in self.built or op.kind not in ("module", "function"):
            return
        self.built.add(op)
        for r in build_relations(op, self.rule(op), self.modules):
            self.relations.append(r)
            for k in (r.a, r.b):
                self.rels_of.setdefault(k, []).append(r)

    def set_codes(self, key, codes: torch.Tensor) -> None:
        self.codes[key] = codes
        self.touch(key)

    def touch(self, key) -> None:
        self.queue.append(key)
        if key[0] != "param":
            op = key[0]
            self.ensure(op)
            for u in op.users:
                self.ensure(u)

    def merge(self, pairs: torch.Tensor, rel: Relation) -> None:
        """Union slot pairs [P, 2] that met at ``rel.op``."""
        for a, b in torch.unique(pairs, dim=0).tolist():
            ra, rb = self.find(a), self.find(b)
            if ra == rb:
                continue
            if not self.allow_merge:
                raise UnitMerge(rel.op, min(ra, rb), max(ra, rb))
            self.parent[max(ra, rb)] = min(ra, rb)
        table = torch.tensor([self.find(s) for s in range(len(self.parent))])
        for k in list(self.codes):
            self.codes[k] = table[self.codes[k]]
            self.queue.append(k)

    def sync(self, r: Relation) -> None:
        ca, cb = self.codes.get(r.a), self.codes.get(r.b)
        va = ca[r.I] if ca is not None else torch.zeros(len(r.I), dtype=torch.long)
        vb = cb[r.J] if cb is not None else torch.zeros(len(r.J), dtype=torch.long)
        if r.bcast and cb is not None and _varies(cb, key_meta(r.b, self.modules).shape, r.bcast):
            return                        # a broadcast operand carries no channel along those axes
        clash = (va > 0) & (vb > 0) & (va != vb)
        if bool(clash.any()):
            self.merge(torch.stack([va[clash], vb[clash]], 1), r)
            return
        fwd = (va > 0) & (vb == 0)
        if bool(fwd.any()):
            if cb is None:
                cb = torch.zeros(key_meta(r.b, self.modules).numel, dtype=torch.long)
            cb[r.J[fwd]] = va[fwd]
            got = cb[r.J]
            bad = (va > 0) & (got != va)  # two positions of a wrote different slots into one position of b
            self.set_codes(r.b, cb)
            if bool(bad.any()):
                self.merge(torch.stack([va[bad], got[bad]], 1), r)
                return
        back = (vb > 0) & (va == 0)
        if not r.one_way and bool(back.any()):
            if ca is None:
                ca = torch.zeros(key_meta(r.a, self.modules).numel, dtype=torch.long)
            ca[r.I[back]] = vb[back]
            got = ca[r.I]
            bad = (vb > 0) & (got != vb)
            self.set_codes(r.a, ca)
            if bool(bad.any()):
                self.merge(torch.stack([vb[bad], got[bad]], 1), r)

    def run(self) -> None:
        while self.queue:
            key = self.queue.pop()
            for r in list(self.rels_of.get(key, ())):
                self.sync(r)


def _varies(codes: torch.Tensor, shape, axes) -> bool:
    c = codes.view(*shape)
    for ax in axes:
        if bool((c != c.narrow(ax, 0, 1)).any()):
            return True
    return False


def target_slots(op: Op) -> torch.Tensor:
    """[numel] slots 1..C of a Conv2d / Linear output: channel k (dim 1, or the last dim of a Linear)."""
    shape = op.meta.shape
    axis = len(shape) - 1 if classify(op).in_axis == -1 else 1
    view = [1] * len(shape)
    view[axis] = shape[axis]
    return torch.arange(1, shape[axis] + 1).view(view).expand(*shape).flatten().clone()


def walk(graph: FlowGraph, target: Op, modules: dict, allow_merge: bool) -> Walk:
    """Spread the target's channels over the network (see the module docstring). ``allow_merge`` False
    raises ``UnitMerge`` where two of its channels meet."""
    st = _State(graph, modules, allow_merge)
    slots = target_slots(target)
    st.parent = list(range(int(slots.max()) + 1))
    st.ensure(target)
    st.set_codes((target, None), slots)
    st.run()
    roots = torch.tensor([st.find(s) for s in range(1, len(st.parent))])
    uniq = torch.unique(roots)                      # sorted: units numbered by their first channel
    unit_of = torch.searchsorted(uniq, roots)
    table = torch.zeros(len(st.parent), dtype=torch.long)
    table[1:] = unit_of + 1
    codes = {k: table[v] for k, v in st.codes.items() if bool((v > 0).any())}
    touched = sorted({k[0] for k in codes if k[0] != "param"} | {u for k in codes if k[0] != "param"
                                                                 for u in k[0].users if u.kind != "output"},
                     key=lambda o: o.index)
    rules = {op: st.rule(op) for op in touched}
    return Walk(graph, target, codes, unit_of, rules, st.relations, touched)
