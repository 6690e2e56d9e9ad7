"""Act at a flow's readers while the model runs as it is (a flow of the recorded front end).

``intercept(model, flow, before, norm)`` is a context manager under which, in every forward of
``model``, each reader's input goes through ``before(reader, x) -> x`` and each normaliser reader's
output is replaced by ``norm(reader, x, weight, bias)``. Reader modules get hooks; functional readers
(``F.conv2d``, ``F.linear``, ``F.layer_norm``... called in forward) are caught by a
``TorchFunctionMode`` that counts calls as the recording did and rewrites the matching one. The model
itself is never changed: hooks are removed on exit.

``applied(model, flow, keep)`` removes the units ``keep`` [P or 1, U + 1] marks (``carfast.graph.masking``):
a ``UnitMask`` before each reader and a ``MaskedNorm`` for each normaliser; ``keep`` may change in place
between forwards. ``recorded(model, example)`` re-records a model for these.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from carfast.errors import FlowError
from carfast.graph.checks import profile, unit_axis
from carfast.graph.ir import is_leaf_module
from carfast.graph.masking import MaskedNorm, UnitMask

__all__ = ["intercept", "applied", "reader_profile", "masked_norm"]


def reader_profile(reader) -> tuple[torch.Tensor, int]:
    """(profile [C]: the unit + 1 of each index along the axis, the axis) of a reader's input codes."""
    axis = reader.axis if reader.kind != "norm" else unit_axis(reader.codes)
    return profile(reader.codes, axis), axis


def masked_norm(reader, rule) -> MaskedNorm:
    """The ``MaskedNorm`` that computes normaliser ``reader`` (rule ``rule``) without the removed units."""
    prof, axis = reader_profile(reader)
    if axis not in rule.axes:
        raise FlowError(f"{reader.op.label} normalises over axes {rule.axes}, but the channels vary along axis "
                        f"{axis}", "spread")
    op = reader.op
    eps = op.target.eps if op.kind == "module" else (op.args[4] if len(op.args) > 4 else op.kwargs.get("eps", 1e-5))
    return MaskedNorm(prof, axis, rule.axes, rule.params[0][1] if rule.params else axis, eps)


def _norm_params(op, args, kwargs):
    if op.kind == "module":
        return getattr(op.target, "weight", None), getattr(op.target, "bias", None)
    return (args[2] if len(args) > 2 else kwargs.get("weight"), args[3] if len(args) > 3 else kwargs.get("bias"))


class _Rewriter(TorchFunctionMode):
    """Counts depth-0 tensor-returning torch calls as ``ir._Recorder`` did; rewrites the readers' calls."""

    def __init__(self, calls: dict, before, norm):
        super().__init__()
        self.calls, self.before, self.norm, self.count, self.depth = calls, before, norm, 0, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.depth:
            return func(*args, **kwargs)
        reader = self.calls.get(self.count)
        if reader is not None and reader.op.target is func:
            x = self.before(reader, args[0]) if self.before is not None else args[0]
            if reader.kind == "norm" and self.norm is not None:
                w, b = _norm_params(reader.op, args, kwargs)
                out = self.norm(reader, x, w, b)
            else:
                out = func(x, *args[1:], **kwargs)
        else:
            out = func(*args, **kwargs)
        if any(isinstance(t, torch.Tensor) for t in tree_flatten(out)[0]):
            self.count += 1
        return out


@contextlib.contextmanager
def intercept(model: nn.Module, flow, before=None, norm=None):
    """See the module docstring."""
    if flow.graph.front_end != "recorded":
        raise ValueError("intercept needs a flow of the recorded front end (carfast.graph.from_recording)")
    handles, calls = [], {}
    index = {op: i for i, op in enumerate(o for o in flow.graph.ops if o.kind == "function" and not o.synthetic)}
    for r in flow.readers:
        if r.op.kind != "module":
            calls[index[r.op]] = r
    mode = _Rewriter(calls, before, norm) if calls else None
    leaves = [m for m in model.modules() if is_leaf_module(m) and m is not model] if mode is not None else []
    # the rewriter counts calls made outside leaf modules; the hooks' own torch calls (a reader's mask)
    # run inside a leaf's depth, so the depth hooks go first on the way in and last on the way out
    if mode is not None:        # calls are counted from the start of each forward, as they were recorded
        handles.append(model.register_forward_pre_hook(lambda *_: setattr(mode, "count", 0)))
    for m in leaves:
        handles.append(m.register_forward_pre_hook(lambda *_: setattr(mode, "depth", mode.depth + 1)))
    for r in flow.readers:
        if r.op.kind != "module":
            continue
        if before is not None:
            handles.append(r.op.target.register_forward_pre_hook(
                lambda m, args, r=r: (before(r, args[0]),) + tuple(args[1:])))
        if r.kind == "norm" and norm is not None:
            handles.append(r.op.target.register_forward_hook(
                lambda m, args, out, r=r: norm(r, args[0], *_norm_params(r.op, (), {}))))
    for m in leaves:
        handles.append(m.register_forward_hook(lambda *_: setattr(mode, "depth", mode.depth - 1)))
    try:
        with mode if mode is not None else contextlib.nullcontext():
            yield
    finally:
        for h in handles:
            h.remove()


def applied(model: nn.Module, flow, keep: torch.Tensor):
    """Every forward of ``model`` under this context removes the units ``keep`` marks (module docstring)."""
    masks, norms = {}, {}
    for r in flow.readers:
        if r.kind == "norm":
            norms[id(r)] = masked_norm(r, flow.walk.rules[r.op])
        else:
            masks[id(r)] = UnitMask(*reader_profile(r))
    return intercept(model, flow,
                     before=lambda r, x: masks[id(r)](x, keep) if id(r) in masks else x,
                     norm=lambda r, x, w, b: norms[id(r)](x, keep, w, b))
