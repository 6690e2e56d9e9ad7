"""Relations between the positions of an op's inputs and outputs, one builder per rule kind.

A ``Relation`` says: position ``I[j]`` of value ``a`` and position ``J[j]`` of value ``b`` hold the same
channel (positions are flat indices into one example's tensor, batch dim 1 included). The walker
(``walker.py``) propagates channel codes along relations in both directions (``one_way``: only from
``a`` to ``b``, for the model's parameters, which receive codes but pass none on).

Values are keys: ``(op, None)`` for an op's tensor, ``(op, i)`` for element i of a tuple it returns, and
``("param", module path, attribute)`` for a tensor a module holds.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils._pytree import tree_flatten, tree_map

from carfast.graph.catalog import Rule, data_args
from carfast.graph.ir import Op, TensorMeta, op_name

__all__ = ["Relation", "value_keys", "key_meta", "build_relations"]


@dataclass(eq=False)
class Relation:
    op: Op
    a: tuple                 # the input side's value key
    b: tuple                 # the output side's value key
    I: torch.Tensor          # [P] positions of a
    J: torch.Tensor          # [P] positions of b
    combine: str = "unary"   # elementwise operands: how they meet ("add" / "mul"); "dw" a depthwise input
    bcast: tuple = ()        # axes of b along which a is broadcast (a carries no channel along them)
    one_way: bool = False


def value_keys(op: Op) -> list[tuple]:
    """The keys of the tensors ``op`` returns."""
    if isinstance(op.meta, TensorMeta):
        return [(op, None)]
    if isinstance(op.meta, (tuple, list)):
        return [(op, i) for i, m in enumerate(op.meta) if isinstance(m, TensorMeta)]
    return []


def key_meta(key, modules: dict) -> TensorMeta:
    if key[0] == "param":
        t = getattr(modules[key[1]], key[2])
        return TensorMeta(tuple(t.shape), t.dtype)
    op, i = key
    return op.meta if i is None else op.meta[i]


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _fiber_pairs(f_a: torch.Tensor, f_b: torch.Tensor):
    """Pairs linking every position of a with the first position of b in the same fiber and vice versa:
    f_a [Na], f_b [Nb] give each position's fiber id (fibers with no position on one side link nothing)."""
    n = int(max(f_a.max().item() if f_a.numel() else -1, f_b.max().item() if f_b.numel() else -1)) + 1
    big = torch.iinfo(torch.long).max
    rep_a = torch.full((n,), big).scatter_reduce(0, f_a, torch.arange(f_a.numel()), "amin")
    rep_b = torch.full((n,), big).scatter_reduce(0, f_b, torch.arange(f_b.numel()), "amin")
    i1, j1 = torch.arange(f_a.numel()), rep_b[f_a]
    i2, j2 = rep_a[f_b], torch.arange(f_b.numel())
    i, j = torch.cat([i1, i2]), torch.cat([j1, j2])
    keep = (i != big) & (j != big)
    return i[keep], j[keep]


def _fibers(shape, axes, drop: bool) -> torch.Tensor:
    """[numel] fiber id of each position of a tensor of ``shape``: positions equal outside ``axes`` share one.
    ``drop``: ``shape`` has the axes removed already (a reduction without keepdim)."""
    if drop:
        return torch.arange(_numel(shape))
    fshape = [1 if d in axes else int(s) for d, s in enumerate(shape)]
    return torch.arange(_numel(fshape)).reshape(fshape).expand(*shape).flatten()


def _broadcast(a_shape, b_shape):
    """(positions of a for every position of b, the axes of b along which a is broadcast)."""
    pad = (1,) * (len(b_shape) - len(a_shape)) + tuple(a_shape)
    idx = torch.arange(_numel(a_shape)).reshape(pad).expand(*b_shape).flatten()
    return idx, tuple(d for d, (s, t) in enumerate(zip(pad, b_shape)) if s == 1 and t > 1)


def _param_key(where, op: Op):
    """The key of a parameter named in a rule: a parameter op, or (module path, attribute)."""
    if isinstance(where, Op):
        return (where, None) if where.kind in ("param", "const") else None
    return ("param", where[0], where[1])


def _param_relations(op: Op, rule: Rule, x_key, modules) -> list[Relation]:
    """One-way relations from the data input to each parameter applied per channel along its axis."""
    out = []
    x_shape = key_meta(x_key, modules).shape
    for where, axis in rule.params:
        key = _param_key(where, op)
        if key is None:
            continue
        p_shape = key_meta(key, modules).shape
        lead = [int(s) for s in x_shape[axis:axis + len(p_shape)]]
        if [int(s) for s in p_shape] != lead and _numel(p_shape) > 1:
            continue                      # e.g. PReLU with one parameter: nothing per channel
        fshape = [int(s) if axis <= d < axis + len(p_shape) else 1 for d, s in enumerate(x_shape)]
        f_x = torch.arange(_numel(fshape)).reshape(fshape).expand(*x_shape).flatten()
        i, j = _fiber_pairs(f_x, torch.arange(_numel(p_shape)))
        out.append(Relation(op, x_key, key, i, j, one_way=True))
    return out


def _elementwise(op: Op, rule: Rule, out_key, modules) -> list[Relation]:
    rels = []
    b_shape = key_meta(out_key, modules).shape
    for a in tree_flatten((op.args, op.kwargs))[0]:
        if not isinstance(a, Op) or not isinstance(a.meta, TensorMeta) or len(a.meta.shape) > len(b_shape):
            continue
        idx, bcast = _broadcast(a.meta.shape, b_shape)
        one_way = a.kind in ("param", "const")
        rels.append(Relation(op, (a, None), out_key, idx, torch.arange(idx.numel()), rule.combine, bcast, one_way))
        if one_way:   # the parameter side receives codes from the output (a per-channel scale / shift)
            rels[-1] = Relation(op, out_key, (a, None), torch.arange(idx.numel()), idx, rule.combine, (), True)
    return rels


def _reduce(op: Op, rule: Rule, x: Op, modules) -> list[Relation]:
    rels = []
    x_shape = x.meta.shape
    f_x = _fibers(x_shape, rule.axes, False)
    for key in value_keys(op):
        shape = key_meta(key, modules).shape
        if len(shape) == len(x_shape):
            f_out = _fibers(shape, rule.axes, False)
        elif len(shape) == len(x_shape) - len(rule.axes):
            f_out = _fibers(shape, rule.axes, True)
        else:
            raise ValueError(f"{op.label}: output rank {len(shape)} does not follow from input rank {len(x_shape)}")
        i, j = _fiber_pairs(f_x, f_out)
        rels.append(Relation(op, (x, None), key, i, j))
    return rels + _param_relations(op, rule, (x, None), modules)


def _resolve(v):
    """The concrete value of a non-data argument (ints computed in forward, index tensors, shapes)."""
    if not isinstance(v, Op):
        return v
    m = v.meta
    if isinstance(m, TensorMeta):
        return m.value if m.value is not None else torch.zeros(m.shape, dtype=torch.long)
    return m


def push(op: Op, rule: Rule, replace: dict, resolve=None):
    """Run a move op on other tensors: ``replace`` maps each data operand to the tensor to use; the other
    arguments take their recorded values (or ``resolve(op)``'s)."""
    resolve = resolve or _resolve

    def sub(v):
        return replace[v] if isinstance(v, Op) and v in replace else resolve(v)
    args = tuple(tree_map(sub, a) if isinstance(a, (list, tuple)) else sub(a) for a in op.args)
    kwargs = {k: sub(v) for k, v in op.kwargs.items()}
    return op.call(args, kwargs)


def _move(op: Op, rule: Rule, modules) -> list[Relation]:
    data = data_args(op, rule)
    if op_name(op) == "getitem" and data and not isinstance(data[0].meta, TensorMeta):
        i = _resolve(op.args[1])                         # element i of a tuple-valued op (split, chunk)
        n = key_meta((data[0], i), modules).numel
        return [Relation(op, (data[0], i), (op, None), torch.arange(n), torch.arange(n))]
    offsets, ids, start = [], {}, 1                      # 0 marks a position that comes from no input
    for a in data:
        n = a.meta.numel
        ids[a] = torch.arange(start, start + n).reshape(a.meta.shape)
        offsets.append((a, start, start + n))
        start += n
    out = push(op, rule, ids)
    outs = [out] if isinstance(out, torch.Tensor) else [t for t in out if isinstance(t, torch.Tensor)]
    rels = []
    for key, src in zip(value_keys(op), outs):
        src = src.flatten()
        for a, lo, hi in offsets:
            hit = (src >= lo) & (src < hi)
            j = hit.nonzero().flatten()
            if j.numel():
                rels.append(Relation(op, (a, None), key, src[j] - lo, j))
    return rels


def _depthwise(op: Op, rule: Rule, modules) -> list[Relation]:
    x = op.args[0]
    shape_in, shape_out = x.meta.shape, op.meta.shape
    m = shape_out[1] // shape_in[1]
    f_in = torch.arange(shape_in[1]).view(1, -1, *([1] * (len(shape_in) - 2))).expand(*shape_in).flatten()
    f_out = (torch.arange(shape_out[1]) // m).view(1, -1, *([1] * (len(shape_out) - 2))).expand(*shape_out).flatten()
    i, j = _fiber_pairs(f_in, f_out)
    # removing input channel c removes its whole group; with one output per group (m == 1) removing that
    # output removes the group too, so the input channel goes with it; with m > 1 an output can go alone
    rels = [Relation(op, (x, None), (op, None), i, j, combine="dw", one_way=m > 1)]
    w = rule.weight
    wkey = ("param", op.name, "weight") if op.kind == "module" else _param_key(w, op)
    bkey = ("param", op.name, "bias") if op.kind == "module" and op.target.bias is not None else \
        (_param_key(rule.bias, op) if isinstance(rule.bias, Op) else None)
    chan_out = torch.arange(shape_out[1]).view(1, -1, *([1] * (len(shape_out) - 2))).expand(*shape_out).flatten()
    for key in (wkey, bkey):
        if key is None:
            continue
        p_shape = key_meta(key, modules).shape
        f_p = torch.arange(p_shape[0]).view(-1, *([1] * (len(p_shape) - 1))).expand(*p_shape).flatten()
        i, j = _fiber_pairs(chan_out, f_p)
        rels.append(Relation(op, (op, None), key, i, j, one_way=True))
    return rels


def build_relations(op: Op, rule: Rule, modules: dict) -> list[Relation]:
    """Every relation of ``op`` under ``rule`` (none for mix, channel_map, ignore and unsupported ops)."""
    if rule.kind == "elementwise":
        keys = value_keys(op)
        return _elementwise(op, rule, keys[0], modules) + \
            (_param_relations(op, rule, keys[0], modules) if rule.params else [])
    if rule.kind == "reduce":
        return _reduce(op, rule, op.args[0], modules)
    if rule.kind == "norm":
        x = op.args[0]
        n = x.meta.numel
        return [Relation(op, (x, None), (op, None), torch.arange(n), torch.arange(n))] + \
            _param_relations(op, rule, (x, None), modules)
    if rule.kind == "move":
        return _move(op, rule, modules)
    if rule.kind == "depthwise":
        return _depthwise(op, rule, modules)
    return []
