"""Physically remove filters: a smaller copy of the network that computes what the masked one computes.

``remove_filters(model, {layer: filters, ...})`` deletes, on a deep copy, each listed filter (a Conv2d
output channel or a Linear output feature) from its layer, from every per-channel op between the layer
and its consumers (BatchNorm statistics and affine parameters; a depthwise Conv2d's group and its m
output channels, and the BN after it), and from the input of every consumer (Conv2d input channels,
grouped or not; Linear input features, the H*W block a channel owns after a flatten). The result
equals the network with the removed channels zeroed at each consumer's input (design.md section 2), up
to float rounding, and is smaller in parameters and MACs (``measure.py``).

The chain and consumers come from the same analysis as scoring (``graph.py`` through torch.fx, or
``dynamic_graph.py`` by recording one forward pass for models fx cannot trace), so surgery refuses
exactly what scoring refuses: coupled channels (a residual add or concat), unknown ops on the chain,
shared modules. Every layer is analysed on the network as passed in, so all indices refer to it.
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

from . import dynamic_graph, graph
from .batching import eval_mode
from .errors import resolve_layer
from .ops_catalog import is_channel_map, is_depthwise

__all__ = ["remove_filters", "apply_edits", "add_edit", "remap_channel_map"]

_FN = "remove_filters"
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
#: square input sizes tried, in order, when no example is given and the first layer is a Conv2d
_GUESS_SIZES = (32, 224, 64, 28, 16, 96, 128)


def remove_filters(model: nn.Module, removals: Mapping, *, example: torch.Tensor | None = None) -> nn.Module:
    """A physically smaller deep copy of ``model`` without the given filters; ``model`` is not changed.

    Args:
        model: the network (any training flags; they are kept on the copy).
        removals: ``{layer: filters}``; ``layer`` is a name from ``model.named_modules()`` or the module
            (a Conv2d or Linear), ``filters`` an iterable of distinct output-channel / feature indices
            of that layer in ``model`` (ints or an integer tensor [R]). Several layers, including a layer
            and its own consumer, are removed in one call; every index refers to ``model`` as passed in.
        example: one input [1, ...] (a batch: its first item is used), needed to trace shapes. When
            None it is inferred: the input shape in ``model.carfast_arch`` (carfast's own models), else
            zeros [1, C, S, S] for a first Conv2d (S in 32, 224, 64, 28, 16, 96, 128) or [1, in_features]
            for a first Linear, the first on which the model runs with output batch 1. The surgery
            depends only on channel counts and on the block of features a channel owns in a Linear after
            a flatten, which that Linear's in_features pins, so any such input gives the same result.
    Returns:
        The pruned copy (same training flags, smaller Conv2d/Linear/BatchNorm modules).
    Raises:
        ValueError: unknown layer, bad indices, all filters of a layer, coupled channels (residual add,
            concat), a shared module or tied weights, an unsupported op on the chain, a grouped conv
            whose groups the removal would make unequal; TypeError: wrong argument types.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{_FN}: model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(removals, Mapping):
        raise TypeError(f"{_FN}: removals must be a dict {{layer: filter indices}}, got {type(removals).__name__}")
    targets = {name: idx for name, idx in _parse_removals(model, removals).items() if idx}
    work = copy.deepcopy(model)
    if not targets:
        return work
    with eval_mode(work), torch.no_grad():
        ex, out_sig = _example(work, example)
        edits, calls = _plan(work, targets, ex)
        apply_edits(work, edits, calls, ex, out_sig)
    return work


def apply_edits(work: nn.Module, edits: dict, calls: Counter, ex: torch.Tensor, out_sig: list, fn: str = _FN) -> None:
    """Slice every module of ``edits`` ({name: (input indices, output indices, [by])}; Conv2d, Linear,
    BatchNorm, and channel-map shortcuts, see ``models.OptionAShortcut``) in place, then check that the
    pruned ``work`` still runs on ``ex`` with output shapes ``out_sig``."""
    modules = dict(work.named_modules())
    _check_not_shared(modules, edits, calls)
    for name, (ins, outs, by) in edits.items():
        if is_channel_map(modules[name]):
            remap_channel_map(modules[name], ins, outs)
        else:
            _slice_module(name, modules[name], ins, outs, by)
    try:
        new_sig = _signature(work(ex))
    except Exception as err:  # noqa: BLE001 - report any failure of the pruned forward the same way
        raise RuntimeError(f"{fn}: the pruned model does not run ({type(err).__name__}: {err}); its forward "
                           "probably hard-codes a channel count (e.g. x.view(-1, 256 * 6 * 6)): write it "
                           "with x.flatten(1) or x.view(x.size(0), -1)") from err
    if new_sig != out_sig:
        raise RuntimeError(f"{fn}: the pruned model's output shapes are {new_sig}, the original's {out_sig}; its "
                           "forward probably hard-codes a channel count: write it with x.flatten(1)")


def remap_channel_map(m: nn.Module, ins: set, outs: set) -> None:
    """Drop input channels ``ins`` and output channels ``outs`` of a channel-map shortcut: input src[i]
    still lands at output dst[i] where both stay, renumbered over what is kept."""
    n_in, n_out, src, dst = m.carfast_channel_map()
    new_in = {c: i for i, c in enumerate(c for c in range(n_in) if c not in ins)}
    new_out = {c: i for i, c in enumerate(c for c in range(n_out) if c not in outs)}
    pairs = [(new_in[s], new_out[d]) for s, d in zip(src, dst) if s in new_in and d in new_out]
    m.set_channel_map(len(new_in), len(new_out), [s for s, _ in pairs], [d for _, d in pairs])


def _parse_removals(model: nn.Module, removals: Mapping, fn: str = _FN) -> dict[str, list[int]]:
    """{layer name: sorted filter indices} from ``removals``, checked; ``fn`` names the caller in errors."""
    out = {}
    for layer, filters in removals.items():
        name, module = resolve_layer(model, layer, fn)
        if name in out:
            raise ValueError(f"{fn}: layer {name!r} is given twice (by name and as a module); give it once "
                             "with all its filters")
        num = graph.target_num_filters(module)
        if isinstance(filters, torch.Tensor):
            if filters.dtype.is_floating_point or filters.dtype == torch.bool or filters.is_complex():
                raise TypeError(f"{fn}: filters of {name!r} must be integer indices, got a {filters.dtype} tensor")
            filters = filters.flatten().tolist()
        if isinstance(filters, (str, bytes)) or not hasattr(filters, "__iter__"):
            raise TypeError(f"{fn}: filters of {name!r} must be an iterable of ints, got {type(filters).__name__}")
        idx = list(filters)
        for k in idx:
            if isinstance(k, bool) or not isinstance(k, numbers.Integral):
                raise TypeError(f"{fn}: filters of {name!r} must be ints, got {k!r} ({type(k).__name__})")
        idx = [int(k) for k in idx]
        bad = [k for k in idx if not 0 <= k < num]
        if bad:
            raise ValueError(f"{fn}: filter indices {bad[:5]} are out of range for {name!r}, which has {num} "
                             f"filters (valid: 0..{num - 1})")
        dup = sorted(k for k, c in Counter(idx).items() if c > 1)
        if dup:
            raise ValueError(f"{fn}: filter indices {dup[:5]} of {name!r} are listed more than once; list each once")
        if len(idx) == num:
            raise ValueError(f"{fn}: removing all {num} filters of {name!r} would cut the network; keep at least "
                             "one (to drop the layer, change the architecture)")
        out[name] = sorted(idx)
    return out


def _signature(out) -> list[tuple]:
    """The shapes of the tensors in a model's output (a tensor, tuple, dict...)."""
    return [tuple(t.shape) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


def _example(model: nn.Module, example, fn: str = _FN) -> tuple[torch.Tensor, list]:
    """(input [1, ...], ``_signature`` of the model's output on it): ``example`` or an inferred input;
    ``fn`` names the caller in errors."""
    if example is not None:
        if not isinstance(example, torch.Tensor) or example.dim() < 1 or example.shape[0] < 1:
            raise TypeError(f"{fn}: example must be an input tensor [1, ...], got "
                            f"{type(example).__name__}{tuple(getattr(example, 'shape', ()))}")
        return example[:1], _signature(model(example[:1]))
    shapes = []
    arch = getattr(model, "carfast_arch", None)
    if isinstance(arch, dict) and arch.get("input_shape"):
        shapes.append(tuple(arch["input_shape"]))
    first = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))), None)
    if isinstance(first, nn.Conv2d):
        shapes += [(first.in_channels, s, s) for s in _GUESS_SIZES]
    elif isinstance(first, nn.Linear):
        shapes.append((first.in_features,))
    p = next(model.parameters(), torch.zeros(()))
    for shape in shapes:
        x = torch.zeros((1, *shape), dtype=p.dtype if p.is_floating_point() else torch.float32, device=p.device)
        try:
            out = model(x)
        except Exception:  # noqa: BLE001 - a guess that does not fit; try the next
            continue
        sig = _signature(out)
        if sig and all(len(s) >= 1 and s[0] == 1 for s in sig):   # batch 1 in, batch 1 out: not folded
            return x, sig
    raise ValueError(f"{fn}: cannot infer an input for {type(model).__name__} (tried shapes "
                     f"{[(1, *s) for s in shapes]}); pass example=, one input [1, ...] such as x[:1]")


def _expand(filters, factor: int) -> set[int]:
    """Filter k owns channels [k*factor, (k+1)*factor) of a tensor downstream."""
    return {k * factor + j for k in filters for j in range(factor)}


def add_edit(edits: dict, name: str, ins=(), outs=(), by=()) -> None:
    """Record in ``edits`` ({module name: (input indices, output indices, [target names])}) that ``name``
    loses inputs ``ins`` and outputs ``outs`` because of the targets ``by`` (a name or names)."""
    e = edits.setdefault(name, (set(), set(), []))
    e[0].update(ins)
    e[1].update(outs)
    e[2].extend(b for b in ([by] if isinstance(by, str) else by) if b not in e[2])


def _plan(work: nn.Module, targets: dict[str, list[int]], ex: torch.Tensor):
    """``({module name: (input indices, output indices, [target names])}, {module name: calls})``."""
    paths, calls = _paths(work, list(targets), ex)
    modules = dict(work.named_modules())
    edits: dict[str, tuple[set, set, list]] = {}

    def edit(name, ins=(), outs=(), by=""):
        add_edit(edits, name, ins, outs, by)

    for target, filters in targets.items():
        num = graph.target_num_filters(modules[target])
        edit(target, outs=filters, by=target)
        steps, consumers = paths[target]
        for name, module, c_in, c_out in steps:
            if c_in % num or c_out % num:
                raise ValueError(f"{_FN}: layer {target!r}: {name!r} sees {c_in} channels for {num} filters; "
                                 "cannot tell which belong to each filter")
            f_in, f_out = c_in // num, c_out // num
            if isinstance(module, _BATCHNORMS):
                edit(name, outs=_expand(filters, f_in), by=target)
            elif is_depthwise(module):
                edit(name, ins=_expand(filters, f_in), outs=_expand(filters, f_out), by=target)
            elif any(True for _ in module.parameters()) or any(t is not None for t in module.buffers()):
                raise ValueError(f"{_FN}: layer {target!r}: its channels pass through {name!r} "
                                 f"({type(module).__name__}), which holds tensors carfast does not know how to "
                                 "slice; only BatchNorm and depthwise Conv2d carry per-channel parameters")
        for name, width in consumers:
            edit(name, ins=_expand(filters, width), by=target)
    return edits, calls


def _paths(work: nn.Module, names: list[str], ex: torch.Tensor):
    """Per target: (chain steps [(name, module, channels in, channels out)], consumers [(name, width)])."""
    try:
        gm = graph.trace(work, ex)
    except graph.TraceError:
        return _paths_recorded(work, names, ex)
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    modules = dict(work.named_modules())
    paths = {}
    for name in names:
        nodes = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == name]
        if len(nodes) != 1:
            raise ValueError(f"{_FN}: layer {name!r} is called {len(nodes)} times in forward; its filters can be "
                             "removed only from a layer that runs exactly once (not shared)")
        chain, consumers = graph.walk_chain(gm, nodes[0], name, _FN)
        steps = []
        for node in chain[1:]:
            if node.op == "call_module":
                steps.append((node.target, modules[node.target], _channels(node.args[0]), _channels(node)))
            elif any(a.op == "get_attr" for a in node.all_input_nodes):
                raise ValueError(f"{_FN}: layer {name!r}: its channels pass through {node.name!r}, a functional "
                                 "op reading the model's own tensors (e.g. F.batch_norm); carfast cannot slice "
                                 "them: use the module form (nn.BatchNorm2d)")
        paths[name] = (steps, [(c.name, c.width) for c in consumers])
    return paths, calls


def _channels(node) -> int:
    return int(node.meta["tensor_meta"].shape[1])


def _paths_recorded(work: nn.Module, names: list[str], ex: torch.Tensor):
    """Same as ``_paths`` for models fx cannot trace, from one recorded forward pass."""
    events, out = dynamic_graph.record_forward(work, ex)
    calls = Counter(e.name for e in events if e.kind == "module")
    paths = {}
    for name in names:
        consumers = dynamic_graph.recorded_consumers(events, out, name, _FN)
        consumer_names = {c.name for c in consumers}
        start = next(i for i, e in enumerate(events) if e.kind == "module" and e.name == name)
        frontier, seen, steps = [(events[start].outputs[0], start)], {start}, []
        while frontier:
            tensor, after = frontier.pop()
            for i in range(after + 1, len(events)):
                e = events[i]
                if i in seen or not any(t is tensor for t in e.inputs):
                    continue
                seen.add(i)
                if e.kind == "module" and e.name in consumer_names:
                    continue
                if e.kind == "module":
                    steps.append((e.name, e.module, int(tensor.shape[1]), int(e.outputs[0].shape[1])))
                elif len(e.inputs) > 1:
                    raise ValueError(f"{_FN}: layer {name!r}: its channels pass through {e.name!r} together with "
                                     "other tensors (e.g. F.batch_norm); carfast cannot slice them: use modules")
                frontier.append((e.outputs[0], i))
        paths[name] = (steps, [(c.name, c.width) for c in consumers])
    return paths, calls


def _check_not_shared(modules: dict, edits: dict, calls: Counter) -> None:
    owners = Counter(id(p) for m in modules.values() for p in m.parameters(recurse=False))
    for name, (_, _, by) in edits.items():
        m = modules[name]
        if calls[name] != 1:
            raise ValueError(f"{_FN}: removing filters of {by} changes {name!r}, which forward calls "
                             f"{calls[name]} times (a shared module); the change would apply at every call: "
                             "give each use its own module")
        if any(owners[id(p)] > 1 for p in m.parameters(recurse=False)):
            raise ValueError(f"{_FN}: removing filters of {by} changes {name!r}, whose weights are tied to another "
                             "module; untie them first")
        if parametrize.is_parametrized(m) or "weight_orig" in m._parameters:
            raise ValueError(f"{_FN}: {name!r} is parametrized (torch.nn.utils.parametrize or prune masks); "
                             "remove the parametrization first (e.g. torch.nn.utils.prune.remove)")


def _keep(n: int, drop: set, device=None) -> torch.Tensor:
    return torch.tensor([i for i in range(n) if i not in drop], dtype=torch.long, device=device)


def _set(module: nn.Module, attr: str, value: torch.Tensor) -> None:
    """Replace a parameter (keeping requires_grad) or a buffer by a new tensor."""
    old = getattr(module, attr)
    value = value.contiguous()
    if isinstance(old, nn.Parameter):
        value = nn.Parameter(value, requires_grad=old.requires_grad)
    setattr(module, attr, value)


def _slice_module(name: str, m: nn.Module, ins: set, outs: set, by: list) -> None:
    """Delete input indices ``ins`` and output indices ``outs`` of Conv2d / Linear / BatchNorm ``m``."""
    if isinstance(m, _BATCHNORMS):
        keep = _keep(m.num_features, outs)
        for attr in ("weight", "bias", "running_mean", "running_var"):
            t = getattr(m, attr)
            if t is not None:
                _set(m, attr, t.detach().index_select(0, keep.to(t.device)))
        m.num_features = len(keep)
    elif isinstance(m, nn.Linear):
        dev = m.weight.device
        rows, cols = _keep(m.out_features, outs, dev), _keep(m.in_features, ins, dev)
        _set(m, "weight", m.weight.detach().index_select(0, rows).index_select(1, cols))
        if m.bias is not None:
            _set(m, "bias", m.bias.detach().index_select(0, rows))
        m.out_features, m.in_features = len(rows), len(cols)
    elif isinstance(m, nn.Conv2d):
        _slice_conv(name, m, ins, outs, by)
    else:
        raise ValueError(f"{_FN}: removing filters of {by} reaches {name!r} ({type(m).__name__}), which carfast "
                         "cannot resize; supported: Conv2d, Linear, BatchNorm")


def _slice_conv(name: str, m: nn.Conv2d, ins: set, outs: set, by: list) -> None:
    """Conv2d with g groups: weight [out, in/g, kh, kw]; output o is in group o // (out/g), input i in
    group i // (in/g). Whole groups (all inputs and outputs) may go; the rest must stay equal in size."""
    g, dev = m.groups, m.weight.device
    ipg, opg = m.in_channels // g, m.out_channels // g
    parts, bias_rows, size = [], [], None
    for j in range(g):
        keep_in = [i - j * ipg for i in range(j * ipg, (j + 1) * ipg) if i not in ins]
        keep_out = [o for o in range(j * opg, (j + 1) * opg) if o not in outs]
        if not keep_in and not keep_out:
            continue
        if not keep_in or not keep_out:
            what = "outputs but no inputs" if keep_out else "inputs but no outputs"
            raise ValueError(f"{_FN}: removing filters of {by} leaves group {j} of Conv2d {name!r} (groups={g}) "
                             f"with {what}; remove the whole group (input channels {j * ipg}..{(j + 1) * ipg - 1}) "
                             "or fewer of its channels")
        if size is None:
            size, first = (len(keep_in), len(keep_out)), j
        elif size != (len(keep_in), len(keep_out)):
            raise ValueError(f"{_FN}: removing filters of {by} leaves Conv2d {name!r} (groups={g}, {ipg} input and "
                             f"{opg} output channels per group) with {size[0]} inputs / {size[1]} outputs in group "
                             f"{first} but {len(keep_in)} / {len(keep_out)} in group {j}; a grouped conv needs "
                             "equal groups: remove the same number of channels from each group")
        rows = torch.tensor(keep_out, dtype=torch.long, device=dev)
        cols = torch.tensor(keep_in, dtype=torch.long, device=dev)
        parts.append(m.weight.detach().index_select(0, rows).index_select(1, cols))
        bias_rows += keep_out
    _set(m, "weight", torch.cat(parts, dim=0))
    if m.bias is not None:
        _set(m, "bias", m.bias.detach().index_select(0, torch.tensor(bias_rows, dtype=torch.long, device=dev)))
    m.groups = len(parts)
    m.in_channels, m.out_channels = size[0] * len(parts), size[1] * len(parts)
