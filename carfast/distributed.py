"""Scoring on several processes through ``torch.distributed`` (docs/design.md section 2: counts add up exactly).

Each process scores its own shard of the images; the per-(filter, class) counts are integers, so their
sum over processes (an all-reduce) is exactly the single-process count on all the images, and every
process gets the same totals. Loss sums are float64 sums, equal to the single-process ones up to the
order of addition. A process that fails before the all-reduce leaves the others waiting until the
process group's timeout (``torch.distributed.init_process_group(timeout=...)``); they then raise a
RuntimeError that says so instead of hanging.
"""
from __future__ import annotations

import warnings

import torch

__all__ = ["resolve_group", "process_group_argument", "all_reduce_sum"]


class _Unset:
    """The default of a deprecated argument: not given."""

    def __repr__(self) -> str:
        return "UNSET"


#: the default of the deprecated ``group=`` argument: "not given"
UNSET = _Unset()


def process_group_argument(process_group, group, fn: str):
    """``process_group=``, or the deprecated ``group=`` (with a DeprecationWarning); not both."""
    if group is UNSET:
        return process_group
    if process_group is not None:
        raise TypeError(f"{fn}: pass process_group= only (group= is its deprecated name)")
    warnings.warn(f"{fn}: group= is deprecated (it named the torch.distributed process group); pass process_group=",
                  DeprecationWarning, stacklevel=3)
    return group


def resolve_group(group, fn: str):
    """The process group to reduce over, or None for a single process.

    group: None (the default group when ``torch.distributed`` is initialised, else single process),
    False (single process even when initialised), or a ``torch.distributed.ProcessGroup``.
    """
    if group is False:
        return None
    dist = torch.distributed
    if group is None:
        if dist.is_available() and dist.is_initialized():
            return dist.group.WORLD
        return None
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"{fn}: process_group={group!r} was given but torch.distributed is not initialised; call "
                         "torch.distributed.init_process_group first (torchrun does it with the env:// method)")
    return group


def all_reduce_sum(tensors: list[torch.Tensor], group, fn: str) -> list[torch.Tensor]:
    """The element-wise sums over the group's processes of ``tensors`` (all int64, or all float64).

    One all-reduce for all of them; on the gloo backend the sum is taken on the CPU. Raises
    RuntimeError naming the likely cause when a process failed or timed out.
    """
    dist = torch.distributed
    flat = torch.cat([t.reshape(-1) for t in tensors])
    device = flat.device
    if dist.get_backend(group) == "gloo":
        flat = flat.cpu()
    try:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    except Exception as err:  # DistBackendError, RuntimeError (timeout, a peer gone)
        raise RuntimeError(f"{fn}: the all-reduce of the scores over {dist.get_world_size(group)} processes failed "
                           f"on rank {dist.get_rank(group)}: another process probably failed or did not reach "
                           f"this point before the process group's timeout ({type(err).__name__}: {err})") from err
    flat = flat.to(device)
    out, i = [], 0
    for t in tensors:
        out.append(flat[i:i + t.numel()].view(t.shape))
        i += t.numel()
    return out
