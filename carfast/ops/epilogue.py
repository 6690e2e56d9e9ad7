"""The elementwise epilogue after a consumer, shared by the closed-form references.

E(v) = act(v * scale + shift + residual), per channel (dim 1 of ``v``, any rank); act codes are shared
with the compiled kernels: 0 identity, 1 relu, 2 relu6.
"""
from __future__ import annotations

import torch

__all__ = ["ACTIVATIONS", "epilogue"]

#: epilogue activation codes shared with the compiled kernels
ACTIVATIONS = {"identity": 0, "relu": 1, "relu6": 2}


def epilogue(v: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, residual: torch.Tensor | None,
             act: int, spatial: int) -> torch.Tensor:
    """E(v) for v [..., C, *spatial dims] (e.g. [N, O, H, W] with spatial=2, or [J, N, O] with spatial=0);
    scale, shift [C]; residual broadcastable to v, or None."""
    per_channel = (-1,) + (1,) * spatial
    v = v * scale.view(per_channel) + shift.view(per_channel)
    if residual is not None:
        v = v + residual
    if act == 1:
        v = torch.relu(v)
    elif act == 2:
        v = v.clamp(0.0, 6.0)
    return v
