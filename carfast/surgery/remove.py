"""Physically remove filters: a smaller copy of the network that computes what the masked one computes.

``remove_filters(model, {layer: filters})`` and ``remove_groups(model, {layer: channels})`` read the
channel-flow analysis (``carfast.graph``) of each layer, the one scoring uses, and delete, on a deep copy,
what removing those units reaches: output rows of every producer (the layer; for a group, every layer
writing the residual stream; a squeeze-and-excitation gate's conv), per-channel tensors on the way
(BatchNorm, depthwise convs, LayerNorm / GroupNorm entries, layer scales), input channels or features
of every reader, and slots of channel-map shortcuts (``slicers.py``, one slicer per layer type; a
shortcut written as a function call becomes a module first, ``channel_map.py``). Every
index refers to the network as passed in. The result is checked against the removal itself: the
pruned copy must give, on the example, the output of the original with the units removed where they
are read (``graph.apply``), or the call fails saying so (a forward that hard-codes a channel count).
"""
from __future__ import annotations

import copy
import numbers
from collections import Counter
from collections.abc import Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils._pytree import tree_leaves

from carfast.batching import eval_mode
from carfast.graph import analyze, build_graph, from_recording
from carfast.graph.apply import applied
from carfast.graph.checks import profile, unit_axis
from carfast.graph.example import infer_example, signature
from carfast.graph.masking import keep_mask
from carfast.graph.registry import layer_filters
from carfast.graph.target import resolve_target
from carfast.surgery.channel_map import rewrite_calls, traced_model
from carfast.surgery.slicers import Edit, slice_module

__all__ = ["remove_filters", "remove_groups", "plan_edits", "parse_removals"]


def remove_filters(model: nn.Module, removals: Mapping, *, example: torch.Tensor | None = None) -> nn.Module:
    """A physically smaller deep copy of ``model`` without the given filters; ``model`` is not changed.

    Args:
        model: the network (any training flags; they are kept on the copy).
        removals: ``{layer: filters}``; ``layer`` is a name from ``model.named_modules()`` or the module
            (a Conv2d or Linear), ``filters`` an iterable of distinct output-channel / feature indices
            of that layer in ``model`` (ints or an integer tensor [R]). A key ``carfast.Group(layer)``
            removes channels of the layer's coupling group instead (as ``remove_groups``). Several targets,
            including a layer and its own consumer, are removed in one call; every index refers to
            ``model`` as passed in.
        example: one input [1, ...] (a batch: its first item is used), needed to trace shapes. When
            None it is inferred: the input shape in ``model.carfast_arch`` (carfast's own models), else
            zeros [1, C, S, S] for a first Conv2d (S in 32, 224, 64, 28, 16, 96, 128) or [1, in_features]
            for a first Linear, the first on which the model runs with output batch 1.
    Returns:
        The pruned copy (same training flags, smaller modules); a ``torch.fx.GraphModule`` where the
        channels pass a channel padding written as a function (see ``remove_groups``).
    Raises:
        ValueError: unknown layer, bad indices, all filters of a layer, channels coupled with other
            layers' (a residual add: use ``remove_groups``), a shared module or tied weights, an op carfast
            cannot follow, a grouped conv whose groups the removal would make unequal; TypeError: wrong
            argument types; RuntimeError: the pruned copy does not compute the removal (its forward
            hard-codes a channel count).
    """
    return _remove(model, removals, example, "remove_filters", group=False)


def remove_groups(model: nn.Module, removals: Mapping, *, example: torch.Tensor | None = None) -> nn.Module:
    """A physically smaller deep copy of ``model`` without the given channels of coupling groups.

    Args:
        model: the network; not changed.
        removals: ``{layer: channels}``; ``layer`` names any producer of a coupling group (the stem conv,
            a block's second conv; see ``score_group``), ``channels`` distinct indices of the group's
            channels (``score_group``'s filters). A layer whose channels are coupled with no other is
            removed as by ``remove_filters``. Two producers of one group may not both be listed.
        example: one input [1, ...] (inferred as ``remove_filters`` does when None).
    Returns:
        The pruned copy. Where the channels pass a channel padding written as a function (``F.pad`` of
        the channel axis: the option-A shortcut in a lambda or in ``forward``), the copy is a
        ``torch.fx.GraphModule`` of the traced forward (``surgery.channel_map.RewrittenModel``, with the
        original's module tree, names and state-dict keys) in which that call is a ``ChannelMap`` module.
    Raises:
        ValueError for bad indices, removing every channel of a group, a group listed twice, such a
        functional padding in a model torch.fx cannot trace, or anything ``remove_filters`` refuses.

    The same as ``remove_filters`` with every key a ``carfast.Group``.
    """
    return _remove(model, removals, example, "remove_groups", group=True)


def _remove(model, removals, example, fn: str, group: bool) -> nn.Module:
    """``remove_filters`` (``group``: every target a coupling group, ``remove_groups``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(removals, Mapping):
        raise TypeError(f"{fn}: removals must be a dict {{layer: filter indices}}, got {type(removals).__name__}")
    parsed = _parse(model, removals, fn, group)
    targets = {name: idx for name, (idx, _) in parsed.items() if idx}
    coupled = {name: g for name, (_, g) in parsed.items()}
    work = copy.deepcopy(model)
    if not targets:
        return work
    with eval_mode(work), torch.no_grad():
        ex, out_sig = infer_example(work, example, fn)
        graph = build_graph(work, ex)
        flows = {name: analyze(work, name, ex, fn, group=coupled[name], graph=graph) for name in targets}
        units = {name: _units(flows[name], idx, fn, coupled[name]) for name, idx in targets.items()}
        _check_one_per_group({name: f for name, f in flows.items() if coupled[name]}, fn)
        calls = _functional_maps(flows)
        rewrites = rewrite_calls(work, graph, calls, fn) if calls else []
        edits: dict[str, Edit] = {}
        for name, flow in flows.items():
            plan_edits(flow, units[name], edits, fn)
        reference = _removed_output(model, targets, units, ex, fn, coupled)
        modules = dict(work.named_modules())
        _check_not_shared(graph, modules, edits, fn)
        for name, e in edits.items():
            slice_module(name, modules[name], e, fn)
        if rewrites:
            work = traced_model(work, graph, rewrites)
        _check_pruned(work, ex, out_sig, reference, fn)
    return work


def _functional_maps(flows: dict) -> list:
    """The channel-map ops written as function calls (``F.pad`` of the channels) that the removals reach."""
    found = []
    for flow in flows.values():
        for x in [*flow.producers, *flow.readers]:
            if x.kind == "channel_map" and x.op.kind == "function" and all(x.op is not o for o in found):
                found.append(x.op)
    return found


def _units(flow, idx: list[int], fn: str, group: bool) -> list[int]:
    """The units removing ``idx`` removes: filters of a layer, or channels of a group (``score_group``'s)."""
    units = sorted({int(flow.unit_of[k]) for k in idx}) if not group else idx
    if group and units[-1] >= flow.num_units:
        raise ValueError(f"{fn}: channel {units[-1]} is out of range: the group of {flow.layer!r} has "
                         f"{flow.num_units} channels (0..{flow.num_units - 1})")
    if len(units) == flow.num_units:
        raise ValueError(f"{fn}: removing all {flow.num_units} channels of {flow.layer!r} would cut the network; "
                         "keep at least one")
    return units


def _check_one_per_group(flows: dict, fn: str) -> None:
    owner = {}
    for name, flow in flows.items():
        for p in flow.producers:
            if p.op.name in owner and owner[p.op.name] != name:
                raise ValueError(f"{fn}: {owner[p.op.name]!r} and {name!r} are in one coupling group; list the "
                                 "group once, by one of its layers")
            owner[p.op.name] = name


def _owner(op, fn: str) -> str:
    """The module whose tensors a conv / linear / channel-map op uses (the module, or its weight's owner)."""
    if op.kind == "module":
        return op.name
    w = _weight(op)
    if getattr(w, "kind", None) == "param":
        return w.module
    raise ValueError(f"{fn}: the channels pass {op.label}, whose weight is not a parameter of the model: surgery "
                     "cuts weights it can find; pass them as nn.Parameter attributes of a module")


def _weight(op):
    return op.args[1] if len(op.args) > 1 else op.kwargs.get("weight")


def _cut(edits: dict, flow, op, fn: str, by: str, ins=(), outs=()) -> None:
    """Record that conv / linear / channel-map ``op`` loses inputs ``ins`` and outputs ``outs``: on its module,
    or, for a functional call whose weight a module other than a Conv2d / Linear holds, on the tensors."""
    owner = _owner(op, fn)
    e = edits.setdefault(owner, Edit())
    if op.kind == "module" or isinstance(flow.modules[owner], (nn.Conv2d, nn.Linear)):
        e.add(ins=ins, outs=outs, by=by)
        return
    w = _weight(op)
    b = op.args[2] if len(op.args) > 2 else op.kwargs.get("bias")
    groups = op.args[6] if len(op.args) > 6 else op.kwargs.get("groups", 1)
    if ins and groups != 1:
        raise ValueError(f"{fn}: the channels reach {op.label}, a grouped conv on tensors of {owner!r}; surgery "
                         "needs it as an nn.Conv2d")
    if ins:
        e.add(params={w.target: (1, ins)}, by=by)
    if outs:
        e.add(params={w.target: (0, outs)}, by=by)
        if getattr(b, "kind", None) == "param":
            e.add(params={b.target: (0, outs)}, by=by)


def _pick(lists: list, units: list[int]) -> list[int]:
    return [int(i) for u in units for i in lists[u].tolist()]


def plan_edits(flow, units: list[int], edits: dict, fn: str) -> None:
    """Add to ``edits`` ({module name: ``Edit``}) what removing ``units`` of ``flow`` deletes."""
    by = flow.layer

    def edit(name):
        return edits.setdefault(name, Edit())

    for p in flow.producers:
        _cut(edits, flow, p.op, fn, by, outs=_pick(p.rows, units))
    for r in flow.readers:
        if r.kind != "norm":                 # a norm's tensors come with the parameters below
            _cut(edits, flow, r.op, fn, by, ins=_pick(r.owned, units))
    w = flow.walk
    for op in w.touched:
        if w.rules[op].kind == "depthwise":   # a whole group goes: its input channel(s) and output channels
            outs = [] if op is w.target else _positions(w.of(op), units, 1)
            x = w.of(op.args[0])       # None for a target with several outputs per group: its inputs stay
            _cut(edits, flow, op, fn, by, ins=[] if x is None else _positions(x, units, 1), outs=outs)
    for key, codes in w.codes.items():       # per-channel tensors: BatchNorm, norms, layer scales, ...
        if key[0] == "param":
            path, attr = key[1], key[2]
        elif key[0].kind == "param":
            path, attr = key[0].module, key[0].target
        else:
            continue
        module = flow.modules[path]
        if layer_filters(module) is not None:
            continue                         # a layer's rows and columns come from the producers and readers
        c = codes.view(*getattr(module, attr).shape)
        dim = unit_axis(c, 0)
        edit(path).add(params={attr: (dim, _positions(c, units, dim))}, by=by)


def _positions(codes: torch.Tensor, units: list[int], axis: int) -> list[int]:
    prof = profile(codes, axis)
    want = torch.tensor([u + 1 for u in units])
    return torch.isin(prof, want).nonzero().flatten().tolist()


def parse_removals(model: nn.Module, removals: Mapping, fn: str) -> dict[str, list[int]]:
    """{layer name: sorted filter indices} from ``removals``, checked; ``fn`` names the caller in errors. A
    ``carfast.Group`` key gives its layer's name (its indices are the group's channels, checked by surgery)."""
    return {name: idx for name, (idx, _) in _parse(model, removals, fn).items()}


def _parse(model: nn.Module, removals: Mapping, fn: str, group: bool = False) -> dict[str, tuple[list[int], bool]]:
    """{layer name: (sorted indices, whether they are channels of its coupling group)}; ``group``: every key
    is a group (``remove_groups``)."""
    out = {}
    for target, filters in removals.items():
        name, module, coupled = resolve_target(model, target, fn, group)
        if name in out:
            raise ValueError(f"{fn}: layer {name!r} is given twice (by name, as a module or as a Group); give it "
                             "once with all its indices")
        word = "channels" if coupled else "filters"
        idx = _indices(filters, name, word, fn)
        num = layer_filters(module)
        bad = [k for k in idx if k < 0 or not (coupled or k < num)]
        if bad:      # (a group's channel count comes from the analysis: surgery checks the upper end)
            valid = ">= 0" if coupled else f"0..{num - 1}, of its {num} filters"
            raise ValueError(f"{fn}: {word[:-1]} indices {bad[:5]} are out of range for {name!r} (valid: {valid})")
        dup = sorted(k for k, c in Counter(idx).items() if c > 1)
        if dup:
            raise ValueError(f"{fn}: {word[:-1]} indices {dup[:5]} of {name!r} are listed more than once; list each "
                             "once")
        if len(idx) == num and not coupled:
            raise ValueError(f"{fn}: removing all {num} filters of {name!r} would cut the network; keep at least "
                             "one (to drop the layer, change the architecture)")
        out[name] = (sorted(idx), coupled)
    return out


def _indices(filters, name: str, word: str, fn: str) -> list[int]:
    """``filters`` (an iterable of ints or an integer tensor) as a list of ints, or TypeError."""
    if isinstance(filters, torch.Tensor):
        if filters.dtype.is_floating_point or filters.dtype == torch.bool or filters.is_complex():
            raise TypeError(f"{fn}: {word} of {name!r} must be integer indices, got a {filters.dtype} tensor")
        filters = filters.flatten().tolist()
    if isinstance(filters, (str, bytes)) or not hasattr(filters, "__iter__"):
        raise TypeError(f"{fn}: {word} of {name!r} must be an iterable of ints, got {type(filters).__name__}")
    idx = list(filters)
    for k in idx:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral):
            raise TypeError(f"{fn}: {word} of {name!r} must be ints, got {k!r} ({type(k).__name__})")
    return [int(k) for k in idx]


def _check_not_shared(graph, modules: dict, edits: dict, fn: str) -> None:
    calls = Counter(o.name for o in graph.ops if o.kind == "module")
    reads = Counter(f"{o.module}.{o.target}" if o.module else o.target for o in graph.ops if o.kind == "param")
    owners = Counter(id(p) for m in modules.values() for p in m.parameters(recurse=False))
    for name, e in edits.items():
        m = modules[name]
        used = max([calls[name]] + [reads[f"{name}.{a}" if name else a] for a in e.params])
        if used > 1:
            raise ValueError(f"{fn}: removing filters of {e.by} changes {name!r}, which forward calls "
                             f"{used} times (a shared module); the change would apply at every call: "
                             "give each use its own module")
        if any(owners[id(p)] > 1 for p in m.parameters(recurse=False)):
            raise ValueError(f"{fn}: removing filters of {e.by} changes {name!r}, whose weights are tied to another "
                             "module; untie them first")
        if parametrize.is_parametrized(m) or "weight_orig" in m._parameters:
            raise ValueError(f"{fn}: {name!r} is parametrized (torch.nn.utils.parametrize or prune masks); "
                             "remove the parametrization first (e.g. torch.nn.utils.prune.remove)")


def _removed_output(model, targets, units, ex, fn: str, coupled: dict) -> torch.Tensor:
    """The original model's output on ``ex`` with the units removed where they are read (``graph.apply``),
    on a recording of an untouched copy (hooks on a copy: the caller's model is never touched)."""
    ref = copy.deepcopy(model)
    with eval_mode(ref), torch.no_grad():
        graph = from_recording(ref, ex)
        contexts = []
        for name in targets:
            flow = analyze(ref, name, ex, fn, group=coupled[name], graph=graph, cut_checks=False)
            contexts.append(applied(ref, flow, keep_mask(None, units[name], flow.num_units, ex.device)))
        for c in contexts:
            c.__enter__()
        try:
            return [t.detach() for t in tree_leaves(ref(ex)) if isinstance(t, torch.Tensor)]
        finally:
            for c in reversed(contexts):
                c.__exit__(None, None, None)


def _check_pruned(work, ex, out_sig, reference, fn: str) -> None:
    try:
        got = [t for t in tree_leaves(work(ex)) if isinstance(t, torch.Tensor)]
    except Exception as err:  # noqa: BLE001 - report any failure of the pruned forward the same way
        raise RuntimeError(f"{fn}: the pruned model does not run ({type(err).__name__}: {err}); its forward "
                           "probably hard-codes a channel count (e.g. x.view(-1, 256 * 6 * 6)): write it "
                           "with x.flatten(1) or x.view(x.size(0), -1)") from err
    if signature(got) != out_sig:
        raise RuntimeError(f"{fn}: the pruned model's output shapes are {signature(got)}, the original's {out_sig}; "
                           "its forward probably hard-codes a channel count: write it with x.flatten(1)")
    for a, b in zip(got, reference):
        if a.is_floating_point():
            scale = float(b.abs().max()) + 1e-6
            err = float((a.float() - b.float()).abs().max())
            if err > 1e-3 * scale:
                raise RuntimeError(f"{fn}: the pruned model computes something other than the removal (largest "
                                   f"difference {err:.3g} for outputs up to {scale:.3g}): its forward probably "
                                   "hard-codes a channel count or picks channels by position")
