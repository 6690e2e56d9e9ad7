"""Is deleting a unit physically possible along the whole flow? Two checks, run before any scoring.

- ``check_separable``: at every value the channels reach, each unit must fill whole slices along one
  axis (a channel of NCHW, a feature after a flatten, the last axis after a permute to NHWC). A channel
  shuffle's intermediate view ``[N, g, C / g, H, W]`` spreads units over two axes: a network with one
  channel fewer there cannot be built, so the removal is refused there.
- ``check_moves``: every op that selects or reshapes positions by size (split, chunk, narrow, slicing,
  view, reshape...) is re-run on the position numbers of the input with the unit deleted, with its
  size arguments recomputed from the smaller shapes where the forward computes them (fx); it must
  select the same positions as before, less the unit's. A split by a size written into forward
  (``x.split(64, 1)``) fails this for units in its first piece, and carfast says so instead of
  building a network that computes something else.
"""
from __future__ import annotations

import torch

from carfast.errors import FlowError
from carfast.graph.catalog import data_args
from carfast.graph.ir import Op, TensorMeta, op_name
from carfast.graph.relations import push, value_keys

__all__ = ["check_separable", "check_moves", "unit_axis", "profile"]

_SIZED = frozenset({"view", "reshape", "flatten", "unflatten", "split", "split_with_sizes", "chunk",
                    "tensor_split", "narrow", "getitem", "select", "unbind", "index_select", "repeat", "tile",
                    "expand", "view_as", "reshape_as"})


def unit_axis(codes: torch.Tensor, first: int = 1) -> int | None:
    """The axis (>= ``first``: 1 for a value [1, ...] of one image, 0 for a parameter) along which ``codes``
    vary while constant along every other, else None."""
    for ax in range(first, codes.dim()):
        c = codes.movedim(ax, -1)
        flat = c.reshape(-1, c.shape[-1])
        if bool((flat == flat[:1]).all()):
            return ax
    return None


def profile(codes: torch.Tensor, axis: int) -> torch.Tensor:
    """The codes along ``axis`` [size], read where every other index is 0 (for codes that vary only along
    ``axis``, as ``unit_axis`` finds: every index along the other axes gives the same)."""
    return codes.movedim(axis, -1).reshape(-1, codes.shape[axis])[0]


def check_separable(w, name: str, fn: str) -> None:
    for key in w.codes:
        if key[0] == "param" or key[0].kind != "function" and key[0].kind != "module":
            continue
        c = w.of(*key)
        if c.dim() > 1 and unit_axis(c) is None:
            raise FlowError(f"{fn}: layer {name!r}: at {key[0].label} its channels are spread over several axes of "
                            f"a {tuple(c.shape)} tensor (as in a channel shuffle's view): a network with one of them "
                            "deleted cannot be built there, so removing a single one is not defined", "spread")


def _reduced_ids(ids: torch.Tensor, codes: torch.Tensor | None, unit: int, first: int = 1) -> torch.Tensor:
    """``ids`` (shaped like a value with ``codes``) without the slices of ``unit``."""
    if codes is None:
        return ids
    ax = unit_axis(codes, first)
    prof = profile(codes, ax)
    return ids.index_select(ax, (prof != unit + 1).nonzero().flatten())


class _Replay:
    """Recompute an op's non-data arguments with every coded value one unit smaller (fx: sizes read in forward)."""

    def __init__(self, w, unit: int, fx: bool):
        self.w, self.unit, self.fx, self.memo = w, unit, fx, {}

    def value(self, v):
        if not isinstance(v, Op):
            return v
        if v in self.memo:
            return self.memo[v]
        m = v.meta
        if isinstance(m, TensorMeta):
            full = m.value if m.value is not None else torch.zeros(m.shape, dtype=torch.long)
            out = _reduced_ids(full, self.w.of(v), self.unit, _first(v)) if (v, None) in self.w.codes else full
        elif self.fx and v.kind == "function":
            try:
                out = v.call(tuple(self.tree(a) for a in v.args), {k: self.tree(a) for k, a in v.kwargs.items()})
            except Exception:  # noqa: BLE001 - a size computation that needs the real tensor: keep its value
                out = m
        else:
            out = m
        self.memo[v] = out
        return out

    def tree(self, a):
        if isinstance(a, (list, tuple)):
            return type(a)(self.tree(x) for x in a)
        return self.value(a)


def _expected(w, op: Op, full, unit: int):
    outs = [full] if isinstance(full, torch.Tensor) else [t for t in full if isinstance(t, torch.Tensor)]
    return [_reduced_ids(t, w.of(*k) if k in w.codes else None, unit, _first(op)) for k, t in zip(value_keys(op), outs)]


def _same(got, expected) -> bool:
    outs = [got] if isinstance(got, torch.Tensor) else [t for t in got if isinstance(t, torch.Tensor)]
    return len(outs) == len(expected) and all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(outs, expected))


def check_moves(w, name: str, fn: str) -> None:
    fx = w.graph.front_end == "fx"
    for op in w.touched:
        rule = w.rules[op]
        sized = op_name(op) in _SIZED or op.kind == "module" and type(op.target).__name__ in ("Flatten", "Unflatten")
        if rule.kind != "move" or not sized:
            continue
        data = data_args(op, rule)
        if not any((a, None) in w.codes for a in data) or not all(isinstance(a.meta, TensorMeta) for a in data):
            continue
        start, ids = 1, {}
        for a in data:
            ids[a] = torch.arange(start, start + a.meta.numel).reshape(a.meta.shape)
            start += a.meta.numel
        full = push(op, rule, ids)
        for u in range(w.num_units):
            replay = _Replay(w, u, fx)
            reduced = {a: _reduced_ids(ids[a], w.of(a) if (a, None) in w.codes else None, u, _first(a)) for a in data}
            try:
                got = push(op, rule, reduced, replay.value)
                ok = _same(got, _expected(w, op, full, u))
            except Exception:  # noqa: BLE001 - the op cannot even run with one channel fewer
                ok = False
            if not ok:
                raise FlowError(f"{fn}: layer {name!r}: with filter {_first_filter(w, u)} deleted, {op.label} would "
                                "not select the same channels (it splits, slices or reshapes them by a size the "
                                "forward does not recompute, e.g. x.view(-1, 256 * 6 * 6) or x.split(64, 1)), so the "
                                "smaller network would compute something else; removal of that filter is not defined "
                                "here (write sizes that follow the tensor, e.g. x.flatten(1))", "sizes")


def _first(op: Op) -> int:
    return 0 if op.kind in ("param", "const") else 1


def _first_filter(w, unit: int) -> int:
    return int((w.unit_of == unit).nonzero()[0])
