"""``Rule``: what one operation does to channels (the kinds are listed in ``catalog``), and the rules
that modules and functions share (group norm, padding)."""
from __future__ import annotations

from dataclasses import dataclass, field

from carfast.graph.ir import TensorMeta

__all__ = ["Rule", "rank_of", "norm_axis", "group_norm_rule", "pad_rule", "channel_map_of"]


@dataclass
class Rule:
    kind: str
    combine: str = "unary"
    axes: tuple = ()                 # reduce / norm: the data axes (0 = batch) pooled or normalised
    params: list = field(default_factory=list)
    linear: bool = False
    why: str = ""
    groups: int = 1                  # mix: a conv's groups
    weight: object = None            # mix / depthwise: the module, or the weight parameter op
    bias: object = None
    in_axis: int = 1                 # mix: the axis of the input it mixes (1 conv, -1 linear)


def rank_of(meta) -> int:
    """The number of dims of a tensor's ``TensorMeta`` (0 for anything else)."""
    return len(meta.shape) if isinstance(meta, TensorMeta) else 0


def norm_axis(d: int, rank: int) -> int:
    """A possibly negative dim ``d`` of a rank-``rank`` tensor as a non-negative one."""
    return d + rank if d < 0 else d


def group_norm_rule(groups: int, channels: int, params: list, rank: int) -> Rule:
    """GroupNorm: per channel (one group per channel), a norm (one group), else unsupported."""
    if groups == channels:
        return Rule("reduce", axes=tuple(range(2, rank)), params=params)
    if groups == 1:
        return Rule("norm", axes=tuple(range(1, rank)), params=params)
    return Rule("unsupported", why=f"a GroupNorm with {groups} groups of {channels // groups} channels: deleting one "
                                   "channel would change which channels each group normalises")


def channel_map_of(op) -> tuple[int, int, list[int], list[int]]:
    """(in, out, src, dst) of a channel-map op: input channel src[i] lands at output dst[i], the other
    outputs are zero. ``op``: a module call (its ``carfast_channel_map()``) or a zero padding of the
    channel axis (``F.pad``, whose rule ``pad_rule`` says is a channel map)."""
    if op.kind == "module":
        return op.target.carfast_channel_map()
    pads = op.args[1] if len(op.args) > 1 else op.kwargs["pad"]
    rank = len(op.args[0].meta.shape)
    n_in = op.args[0].meta.shape[1]
    front, back = int(pads[2 * (rank - 2)]), int(pads[2 * (rank - 2) + 1])
    return n_in, n_in + front + back, list(range(n_in)), [c + front for c in range(n_in)]


def pad_rule(pad: tuple, value, mode: str, rank: int) -> Rule:
    """Padding: a move of the spatial positions, or a channel map when it zero-pads the channel axis."""
    covered = len(pad) // 2                       # pads the last `covered` dims, last dim first
    channel = rank >= 2 and covered >= rank - 1 and any(pad[2 * (rank - 2):2 * (rank - 1)])
    if not channel:
        return Rule("move", linear=mode == "constant" and value in (None, 0, 0.0))
    if mode == "constant" and value in (None, 0, 0.0) and not any(pad[:2 * (rank - 2)]):
        return Rule("channel_map")
    return Rule("unsupported", why="padding of the channel axis that is not a plain zero channel padding")
