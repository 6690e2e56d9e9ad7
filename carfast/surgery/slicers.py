"""Delete channels of one module: one slicer per layer type, and a plain one for any other tensor.

An ``Edit`` says what a module loses: input indices ``ins`` (a Conv2d's input channels, a Linear's
input features, a channel-map shortcut's input slots), output indices ``outs`` (output channels /
features, a norm's or a BatchNorm's entries, a shortcut's output slots), and ``params``: other tensors
of the module to cut along one dim ({attribute: (dim, indices)}, e.g. a layer scale). ``slice_module``
applies it in place, keeping each parameter's ``requires_grad`` and the module's size attributes
(``in_channels``, ``num_features``, ``normalized_shape``...) consistent, and refuses, saying why, what no
module of that type can be (a grouped conv with unequal groups).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from carfast.graph import is_channel_map
from carfast.graph.registry import defines, user_handler

__all__ = ["Edit", "slice_module", "remap_channel_map", "cut_tensor"]


@dataclass
class Edit:
    """What one module loses (see the module docstring); ``by``: the layers whose removal asks for it."""
    ins: set = field(default_factory=set)
    outs: set = field(default_factory=set)
    params: dict = field(default_factory=dict)
    by: list = field(default_factory=list)

    def add(self, ins=(), outs=(), params=None, by=()) -> "Edit":
        self.ins.update(int(i) for i in ins)
        self.outs.update(int(o) for o in outs)
        for attr, (dim, idx) in (params or {}).items():
            old = self.params.setdefault(attr, (dim, set()))
            if old[0] != dim:
                raise ValueError(f"{attr} is cut along dims {old[0]} and {dim}")
            old[1].update(int(i) for i in idx)
        self.by.extend(b for b in ([by] if isinstance(by, str) else by) if b not in self.by)
        return self


def _keep(n: int, drop: set, device=None) -> torch.Tensor:
    return torch.tensor([i for i in range(n) if i not in drop], dtype=torch.long, device=device)


def _set(module: nn.Module, attr: str, value: torch.Tensor) -> None:
    """Replace a parameter (keeping requires_grad) or a buffer by a new tensor."""
    old = getattr(module, attr)
    value = value.contiguous()
    if isinstance(old, nn.Parameter):
        value = nn.Parameter(value, requires_grad=old.requires_grad)
    setattr(module, attr, value)


def cut_tensor(module: nn.Module, attr: str, dim: int, drop) -> int:
    """Delete indices ``drop`` of tensor ``attr`` of ``module`` along ``dim`` (a parameter keeps its
    ``requires_grad``); returns its new size there. For ``ModuleHandler.slice`` of a registered type."""
    drop = set(int(i) for i in drop)
    t = getattr(module, attr)
    keep = _keep(t.shape[dim], drop, t.device)
    _set(module, attr, t.detach().index_select(dim, keep))
    return len(keep)


def remap_channel_map(m: nn.Module, ins: set, outs: set) -> None:
    """Drop input channels ``ins`` and output channels ``outs`` of a channel-map shortcut: input src[i]
    still lands at output dst[i] where both stay, renumbered over what is kept."""
    n_in, n_out, src, dst = m.carfast_channel_map()
    new_in = {c: i for i, c in enumerate(c for c in range(n_in) if c not in ins)}
    new_out = {c: i for i, c in enumerate(c for c in range(n_out) if c not in outs)}
    pairs = [(new_in[s], new_out[d]) for s, d in zip(src, dst) if s in new_in and d in new_out]
    m.set_channel_map(len(new_in), len(new_out), [s for s, _ in pairs], [d for _, d in pairs])


def _entries(m: nn.Module, e: Edit, names) -> set:
    """The entries a per-channel module loses: its ``outs``, and what its tensors' own edits say."""
    drop = set(e.outs)
    for attr in names:
        if attr in e.params:
            drop |= e.params[attr][1]
    return drop


def _slice_norm(m, e: Edit, count_attr: str) -> None:
    names = ("weight", "bias", "running_mean", "running_var")
    drop = _entries(m, e, names)
    n = None
    for attr in names:
        if getattr(m, attr, None) is not None:
            n = cut_tensor(m, attr, 0, drop)
    setattr(m, count_attr, n if n is not None else getattr(m, count_attr) - len(drop))


def _slice_layer_norm(m: nn.LayerNorm, e: Edit) -> None:
    dim = next((d for d, _ in (e.params.get(a, (None, ())) for a in ("weight", "bias")) if d is not None), 0)
    drop = _entries(m, e, ("weight", "bias"))
    shape = list(m.normalized_shape)
    for attr in ("weight", "bias"):
        if getattr(m, attr, None) is not None:
            cut_tensor(m, attr, dim, drop)
    shape[dim] -= len(drop)
    m.normalized_shape = tuple(shape)


def _slice_group_norm(m: nn.GroupNorm, e: Edit) -> None:
    drop = _entries(m, e, ("weight", "bias"))
    per_channel = m.num_groups == m.num_channels
    for attr in ("weight", "bias"):
        if getattr(m, attr, None) is not None:
            cut_tensor(m, attr, 0, drop)
    m.num_channels -= len(drop)
    if per_channel:
        m.num_groups = m.num_channels


def _slice_linear(m: nn.Linear, e: Edit) -> None:
    if e.outs:
        m.out_features = cut_tensor(m, "weight", 0, e.outs)
        if m.bias is not None:
            cut_tensor(m, "bias", 0, e.outs)
    if e.ins:
        m.in_features = cut_tensor(m, "weight", 1, e.ins)


def slice_conv(name: str, m: nn.Conv2d, ins: set, outs: set, by: list, fn: str) -> None:
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
            raise ValueError(f"{fn}: removing filters of {by} leaves group {j} of Conv2d {name!r} (groups={g}) "
                             f"with {what}; remove the whole group (input channels {j * ipg}..{(j + 1) * ipg - 1}) "
                             "or fewer of its channels")
        if size is None:
            size, first = (len(keep_in), len(keep_out)), j
        elif size != (len(keep_in), len(keep_out)):
            raise ValueError(f"{fn}: removing filters of {by} leaves Conv2d {name!r} (groups={g}, {ipg} input and "
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


#: torch.nn layer types -> slicer(name, module, edit, fn); found along the MRO (a subclass is sliced as its base)
_SLICERS = {
    nn.Conv2d: lambda name, m, e, fn: slice_conv(name, m, e.ins, e.outs, e.by, fn),
    nn.Linear: lambda name, m, e, fn: _slice_linear(m, e),
    _BatchNorm: lambda name, m, e, fn: _slice_norm(m, e, "num_features"),
    _InstanceNorm: lambda name, m, e, fn: _slice_norm(m, e, "num_features"),
    nn.LayerNorm: lambda name, m, e, fn: _slice_layer_norm(m, e),
    nn.GroupNorm: lambda name, m, e, fn: _slice_group_norm(m, e),
    nn.PReLU: lambda name, m, e, fn: setattr(m, "num_parameters", cut_tensor(m, "weight", 0,
                                                                            _entries(m, e, ("weight",)))),
}


def _slice_other(name: str, m: nn.Module, e: Edit, fn: str) -> None:
    """A module carfast has no slicer for: its per-channel tensors are cut; its channels cannot be."""
    if e.ins or e.outs:
        raise ValueError(f"{fn}: removing filters of {e.by} reaches {name!r} ({type(m).__name__}), which carfast "
                         "cannot resize; supported: Conv2d, Linear, BatchNorm, LayerNorm, GroupNorm, tensors "
                         "applied channel by channel, and types registered with a handler that defines slice "
                         "(carfast.register_module)")
    for attr, (dim, idx) in e.params.items():
        cut_tensor(m, attr, dim, idx)


def slice_module(name: str, m: nn.Module, e: Edit, fn: str) -> None:
    """Apply edit ``e`` to module ``m`` (called ``name``) in place; ``fn`` names the caller in errors. A
    registered type is sliced by its handler's ``slice`` (``graph.registry``)."""
    if is_channel_map(m):
        remap_channel_map(m, e.ins, e.outs)
        return
    handler = user_handler(m)
    if defines(handler, "slice"):
        handler.slice(m, sorted(e.ins), sorted(e.outs), {a: (d, sorted(i)) for a, (d, i) in e.params.items()})
        return
    slicer = None if handler is not None else next((_SLICERS[t] for t in type(m).__mro__ if t in _SLICERS), None)
    (slicer or _slice_other)(name, m, e, fn)
