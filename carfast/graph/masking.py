"""Removal applied inside a network run: keep masks at readers, and normalisers over what remains.

Both modules take ``keep`` [P, U + 1]: for each of P runs (a (filter, image) pair, or an image with the
removals made so far), 1 for a unit that stays and 0 for a removed one; column 0 stands for positions
that belong to no unit and is always 1.

- ``UnitMask(profile, axis)``: x [P, ...] with the positions of removed units zeroed along ``axis``,
  where ``profile`` [C] says which unit (+1) each index along ``axis`` belongs to. Inserted before a
  reader (a Conv2d / Linear input, a channel-map shortcut) it is exactly "the reader no longer sees the
  channel": multiplying by 1 or 0 is exact.
- ``MaskedNorm``: LayerNorm / GroupNorm(1) over the positions of the normalised axes that remain, with
  the weight and bias entries of the removed ones unused, as the physically smaller norm computes;
  removed positions come out zero. Zeroing a channel inside the mean would be a different quantity.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["UnitMask", "MaskedNorm", "keep_mask"]


def keep_mask(units, removed, num_units: int, device, dtype=torch.float32) -> torch.Tensor:
    """[P, U + 1]: row p keeps every unit except ``units[p]`` (a [P] tensor, or None for P = 1 and no
    extra unit) and the ``removed`` ones."""
    p = 1 if units is None else len(units)
    keep = torch.ones(p, num_units + 1, device=device, dtype=dtype)
    if removed:
        keep[:, torch.as_tensor(list(removed), device=device) + 1] = 0
    if units is not None:
        keep[torch.arange(p, device=device), units.to(device) + 1] = 0
    return keep


def _broadcast_view(m: torch.Tensor, rank: int, axis: int) -> torch.Tensor:
    """m [P, C] viewed [P, 1, .., C (at ``axis``), .., 1] for a tensor of ``rank`` dims."""
    shape = [m.shape[0]] + [1] * (rank - 1)
    shape[axis] = m.shape[1]
    return m.reshape(shape)


class UnitMask(nn.Module):
    """x [P, ...] * keep[:, profile] along ``axis`` (see the module docstring)."""

    def __init__(self, profile: torch.Tensor, axis: int):
        super().__init__()
        self.register_buffer("profile", profile.detach().clone().long(), persistent=False)
        self.axis = axis

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        m = keep.index_select(1, self.profile).to(x.dtype)                    # [P, C]
        axis = self.axis % x.dim()
        return x * _broadcast_view(m, x.dim(), axis)


class MaskedNorm(nn.Module):
    """A LayerNorm (normalised over the last dims) or GroupNorm(1) (over dims 1..) restricted to the
    positions that remain. ``axes``: the normalised dims; ``profile`` [C]: the unit (+1) of each index
    along ``axis`` (within ``axes``); ``param_axis``: the dim weight and bias align with (their first dim)."""

    def __init__(self, profile: torch.Tensor, axis: int, axes: tuple, param_axis: int, eps: float):
        super().__init__()
        self.register_buffer("profile", profile.detach().clone().long(), persistent=False)
        self.axis, self.axes, self.param_axis, self.eps = axis, tuple(axes), param_axis, float(eps)

    def forward(self, x: torch.Tensor, keep: torch.Tensor, weight=None, bias=None) -> torch.Tensor:
        m = _broadcast_view(keep.index_select(1, self.profile).to(x.dtype), x.dim(), self.axis)
        m = m.expand(x.shape[0], *m.shape[1:]) if m.shape[0] != x.shape[0] else m
        count = m.sum(dim=self.axes, keepdim=True)
        for d in self.axes:
            if m.shape[d] == 1:
                count = count * x.shape[d]
        mean = (x * m).sum(dim=self.axes, keepdim=True) / count
        centred = (x - mean) * m
        var = (centred * centred).sum(dim=self.axes, keepdim=True) / count
        y = centred * torch.rsqrt(var + self.eps)
        if weight is not None or bias is not None:
            shape = [1] * x.dim()
            ref = weight if weight is not None else bias
            for i, s in enumerate(ref.shape):
                shape[self.param_axis + i] = s
            if weight is not None:
                y = y * weight.reshape(shape)
            if bias is not None:
                y = y + bias.reshape(shape)
        return y * m
