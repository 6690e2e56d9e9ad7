"""``analyze``: the one channel-flow analysis behind scoring, surgery, masks and criteria.

Removing unit u of a layer (a filter, or the channels of a coupling group that can only go together)
means: every *reader* of its positions (a Conv2d / Linear input, a channel-map shortcut's input) no
longer sees them, every *normaliser* (LayerNorm, GroupNorm(1)) normalises over the positions that
remain, and surgery deletes them from every member: producers' output rows, per-channel parameters
(BatchNorm, depthwise convs, norms, layer scales, a gate's producer), readers' inputs, channel maps.

``Flow.coupled`` says whether the removal reaches other producers through a residual add (or through
the gated operand of a squeeze-and-excitation ``mul``): ``score_layer`` refuses those and names
``score_group``; a producer reached only as the gate of the target's channels (the conv that makes an
SE gate), or the input producer of a depthwise target, goes along without making it coupled.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx, nn

from carfast.errors import FlowError, TraceError, UnitMerge
from carfast.graph.checks import check_moves, check_separable, profile
from carfast.graph.ir import FlowGraph, Op, TensorMeta, from_fx, from_recording
from carfast.graph.walker import Walk, walk

__all__ = ["Reader", "Producer", "Flow", "FlowError", "analyze", "build_graph", "find_target"]


@dataclass
class Reader:
    """An op that reads the units' positions: where removal is applied.

    kind: "conv" / "linear" (a consumer; ``owned[u]`` the input channels / features unit u owns along
    ``axis``), "norm" (renormalises over the positions that remain; ``codes`` marks them), or
    "channel_map" (a shortcut into the next residual stream; ``owned[u]`` its input channels).
    """
    op: Op
    kind: str
    axis: int
    codes: torch.Tensor                  # the reader input's codes, shaped like it (batch 1)
    owned: list = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.op.name


@dataclass
class Producer:
    """An op whose output channels are the units' (``rows[u]``: output channels along ``axis``)."""
    op: Op
    kind: str                            # "conv" / "linear" / "channel_map"
    axis: int
    rows: list
    essential: bool = True               # False: reached only as the gate of the target's channels


@dataclass
class Flow:
    """Where removing each unit of ``layer`` reaches (see the module docstring)."""
    layer: str
    graph: FlowGraph = field(repr=False)
    walk: Walk = field(repr=False)
    readers: list[Reader]
    producers: list[Producer]
    coupled: bool
    modules: dict = field(repr=False, default_factory=dict)     # the model's modules by name

    @property
    def num_units(self) -> int:
        return self.walk.num_units

    @property
    def unit_of(self) -> torch.Tensor:
        return self.walk.unit_of

    @property
    def consumers(self) -> list[Reader]:
        return [r for r in self.readers if r.kind in ("conv", "linear")]

    def codes(self, op: Op) -> torch.Tensor | None:
        return self.walk.of(op)


def build_graph(model: nn.Module, example: torch.Tensor) -> FlowGraph:
    """The model's ops on ``example`` [1, ...]: the fx front end, else one recorded pass. A network whose
    functional channel maps surgery rewrote (``surgery.channel_map``) is analysed on its own graph."""
    try:
        if isinstance(model, fx.GraphModule) and isinstance(getattr(model, "carfast_rewrites", None), list):
            return from_fx(model, example, gm=model)
        return from_fx(model, example)
    except TraceError:
        return from_recording(model, example)


def find_target(graph: FlowGraph, name: str, fn: str) -> Op:
    calls = graph.module_calls(name)
    if len(calls) != 1:
        what = "never called" if not calls else f"called {len(calls)} times (shared weights)"
        raise FlowError(f"{fn}: layer {name!r} is {what} in the model's forward; its filters can be removed only "
                        "from a layer that runs exactly once", "shared")
    return calls[0]


def _profile(codes: torch.Tensor, axis: int) -> torch.Tensor | None:
    """codes [1, ...] -> the 1-D codes along ``axis`` if they are constant along every other axis."""
    prof = profile(codes, axis)
    shape = [1] * codes.dim()
    shape[axis] = -1
    return prof if bool((codes == prof.view(shape)).all()) else None


def _owned(profile: torch.Tensor, units: int) -> list[torch.Tensor]:
    return [(profile == u + 1).nonzero().flatten() for u in range(units)]


def analyze(model: nn.Module, name: str, example: torch.Tensor, fn: str, group: bool = False,
            graph: FlowGraph | None = None, cut_checks: bool = True) -> Flow:
    """The flow of layer ``name``'s channels (``group``: as a coupling group, units may merge).

    ``example`` is one input [1, ...]; ``graph`` the model's ops on it (default: ``build_graph``).
    Raises ``FlowError`` naming the op where carfast cannot follow or where removal is not defined, and
    saying what to do; ``cut_checks`` False skips the checks that a physically smaller network exists
    (``checks.py``), for a flow used only to apply a removal already checked."""
    graph = graph if graph is not None else build_graph(model, example)
    target = find_target(graph, name, fn)
    modules = dict(model.named_modules())
    try:
        w = walk(graph, target, modules, allow_merge=group)
    except UnitMerge as err:
        raise FlowError(f"{fn}: layer {name!r}: its {err} ({_describe(err.op)}), so they cannot be removed one at "
                        f"a time; score them together: pass carfast.Group({name!r}) as the layer", "merge") from None
    _check_ops(w, name, fn)
    readers, producers = _readers(w, name, fn), _producers(w, name, fn)
    entry = _coupling(w, producers)
    if entry is not None and not group:
        raise FlowError(_coupled_message(fn, name, entry), "coupled")
    if cut_checks:
        check_separable(w, name, fn)
        check_moves(w, name, fn)
    return Flow(name, graph, w, readers, producers, entry is not None, modules)


def analyze_units(model: nn.Module, name: str, example: torch.Tensor, fn: str, graph: FlowGraph | None = None,
                  cut_checks: bool = True) -> tuple[Flow, bool]:
    """(flow, group): the flow of layer ``name``'s filters, or, where they are coupled with other layers'
    channels or merge (``FlowError`` reason "coupled" / "merge"), of its coupling group (``group`` True:
    the units are the group's channels). Any other refusal raises ``FlowError``."""
    graph = graph if graph is not None else build_graph(model, example)
    try:
        return analyze(model, name, example, fn, graph=graph, cut_checks=cut_checks), False
    except FlowError as err:
        if err.reason not in ("coupled", "merge"):
            raise
    return analyze(model, name, example, fn, group=True, graph=graph, cut_checks=cut_checks), True


def _describe(op: Op) -> str:
    return f"a {type(op.target).__name__}" if op.kind == "module" else f"{op.name}"


def _check_ops(w: Walk, name: str, fn: str) -> None:
    """Unsupported ops, constants and the model's output reached by the channels."""
    live = _live(w.graph)
    for op in w.touched:
        rule = w.rules[op]
        if rule.kind == "unsupported" and op in live and any((a, None) in w.codes for a in op.inputs()):
            raise FlowError(f"{fn}: layer {name!r}: its channels reach {op.label}, {rule.why}; carfast follows "
                            "per-channel ops, moves of channels, residual adds, gates and normalisers into Conv2d / "
                            "Linear layers. Score a layer whose channels do not reach it")
    for k in w.codes:
        if k[0] != "param" and k[0].kind == "const":
            raise FlowError(f"{fn}: layer {name!r}: its channels meet a tensor made in forward ({k[0].label}) "
                            "position by position; carfast cannot delete channels of it", "constant")
    if any(k[0] is a for a in w.graph.output.inputs() for k in w.codes):
        raise FlowError(f"{fn}: layer {name!r} produces the model's outputs (its channels reach the output without "
                        "a Conv2d or Linear reading them); the output layer cannot be pruned: score the layers "
                        "before it", "output")


def _live(graph: FlowGraph) -> set:
    """The ops whose results reach the model's output (an op that only feeds, say, a Python ``if`` in a
    recorded forward is not among them: what it computes is re-evaluated on every run anyway)."""
    live, stack = set(), list(graph.output.inputs())
    while stack:
        op = stack.pop()
        if op not in live:
            live.add(op)
            stack.extend(op.inputs())
    return live


def _readers(w: Walk, name: str, fn: str) -> list[Reader]:
    out = []
    for op in w.touched:
        rule = w.rules[op]
        if rule.kind not in ("mix", "norm", "channel_map"):
            continue
        # the target is a reader too where its input carries the units (a layer that reads and writes one
        # stream, as RepVGG's 1x1 and 3x3 branches do): it must stop seeing them like every other reader
        x = op.args[0] if op.args and isinstance(op.args[0], Op) else None
        codes = w.of(x) if x is not None else None
        if codes is None:
            continue
        if rule.kind == "norm":
            out.append(Reader(op, "norm", rule.axes[0], codes))
            continue
        axis = codes.dim() - 1 if rule.in_axis == -1 else 1
        prof = _profile(codes, axis)
        if prof is None:
            raise FlowError(f"{fn}: layer {name!r}: {op.label} reads its channels spread over the positions of "
                            "the input, not whole channels; carfast removes whole input channels", "spread")
        owned = _owned(prof, w.num_units)
        kind = "channel_map" if rule.kind == "channel_map" else ("linear" if rule.in_axis == -1 else "conv")
        out.append(Reader(op, kind, axis, codes, owned))
    return out


def _producers(w: Walk, name: str, fn: str) -> list[Producer]:
    out = []
    for op in w.touched:
        rule = w.rules[op]
        codes = w.of(op) if isinstance(op.meta, TensorMeta) else None
        if codes is None or rule.kind not in ("mix", "channel_map", "depthwise"):
            continue
        if rule.kind == "depthwise":
            if op is w.target:
                out.append(Producer(op, "conv", 1, _owned(_profile(codes, 1), w.num_units), essential=True))
            continue
        axis = codes.dim() - 1 if rule.in_axis == -1 and rule.kind == "mix" else 1
        prof = _profile(codes, axis)
        if prof is None:
            raise FlowError(f"{fn}: layer {name!r}: its channels are tied to parts of {op.label}'s output channels",
                            "spread")
        kind = "channel_map" if rule.kind == "channel_map" else ("linear" if rule.in_axis == -1 else "conv")
        out.append(Producer(op, kind, axis, _owned(prof, w.num_units)))
    return out


# ---- is the removal the target's alone? ---------------------------------------------------------------------
def _carries(w: Walk, r) -> bool:
    ca = w.codes.get(r.a)
    return ca is not None and bool((ca[r.I] > 0).any())


def _coupling(w: Walk, producers: list[Producer]):
    """None when every other producer is reached only as a gate of the target's channels (marking them not
    essential); else the op where another producer's channels join (an add, or the gated side of a mul),
    leaving the producers marked essential.

    What the target's channels reach going forward is its own; the channels of any other operand they
    meet there (an input of an op entered from its output) belong to other producers: for a mul, or the
    input of a depthwise target, that is fine when everything behind that operand serves only it."""
    rels_of = {}
    for r in w.relations:
        if not r.one_way and _carries(w, r):
            for k in (r.a, r.b):
                rels_of.setdefault(k, []).append(r)
    start = (w.target, None)
    forward, queue = {start}, [start]
    while queue:
        k = queue.pop()
        for r in rels_of.get(k, ()):
            if r.a == k and r.b not in forward:
                forward.add(r.b)
                queue.append(r.b)
    gates = set()
    for r in w.relations:
        if r.b in forward and r.a not in forward and not r.one_way and _carries(w, r):
            region = _gate_region(w, r, rels_of) if r.combine in ("mul", "dw") else None
            if region is None:
                return r.op
            gates |= {k[0] for k in region}
    for p in producers:
        if p.op is not w.target:
            if p.op not in gates:
                return p.op
            p.essential = False
    return None


def _gate_region(w: Walk, entry, rels_of) -> set | None:
    """The values behind a gate operand, walking back to the producers that make it; None if any of them
    is read anywhere else (then the gate's producers are coupled with the target, not its gates)."""
    region, stack = set(), [(entry.a, entry)]
    while stack:
        k, came = stack.pop()
        region.add(k)
        for r in rels_of.get(k, ()):
            if r is came:
                continue
            if r.b == k:                       # further back: an input of the op that made k
                if r.a not in region:
                    stack.append((r.a, r))
            else:
                return None                    # k also feeds something else
        op = k[0]
        for u in op.users:
            rule = w.rules.get(u)
            if rule is not None and rule.kind in ("mix", "norm", "channel_map") and u is not came.op:
                return None                    # read by a layer: its channels matter beyond the gate
        if op.kind == "input":
            return None
    return region


def _coupled_message(fn: str, name: str, op: Op) -> str:
    head = (f"{fn}: layer {name!r} cannot be {'cut' if fn.startswith('remove') else 'scored'} on its own: its "
            f"channels meet other layers' channels at {op.label} (a residual add or the gated side of a "
            "multiplication), so removing one means removing it from every member of the coupling group. ")
    if fn.startswith("remove") or fn == "to_masks":
        return head + (f"Cut the group's channels with carfast.remove_filters({{carfast.Group({name!r}): channels}}) "
                       f"(or carfast.remove_groups({{{name!r}: channels}}))")
    return head + (f"Score the whole group with carfast.score_group({name!r}) (the target carfast.Group({name!r}); "
                   "carfast score --group) or prune it "
                   f"with carfast.prune (which takes {name!r} as its group), or score a layer whose channels reach "
                   "only convolutions or linears, such as a ResNet block's first conv")

