"""Parameter-free channel maps: input channel ``src[i]`` lands at output channel ``dst[i]``, every other output
channel is zero (positions along the other axes unchanged).

``ChannelMap`` is the general module (surgery makes one of a functional channel padding,
``surgery/channel_map.py``); ``cifar.OptionAShortcut`` is the ResNet shortcut that subsamples, then maps.
Both keep the map the same way (``set_map``) and apply it the same way (``apply_map``), and report it
with ``carfast_channel_map()``, which makes them channel-map steps to carfast's graph code and surgery.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["ChannelMap", "set_map", "apply_map"]


def set_map(m: nn.Module, in_channels: int, out_channels: int, src: list[int], dst: list[int]) -> None:
    """Store on ``m`` the map input channel src[i] -> output channel dst[i] (sizes, lists and index buffers)."""
    if len(src) != len(dst):
        raise ValueError(f"{type(m).__name__}: src and dst must have one entry per moved channel, got {len(src)} "
                         f"and {len(dst)}")
    m.in_channels, m.out_channels = int(in_channels), int(out_channels)
    m.src, m.dst = [int(c) for c in src], [int(c) for c in dst]
    device = m.src_index.device if hasattr(m, "src_index") else None
    # index buffers (not saved: pruned_io records the map) so the module moves with .to(device)
    m.register_buffer("src_index", torch.tensor(m.src, dtype=torch.long, device=device), persistent=False)
    m.register_buffer("dst_index", torch.tensor(m.dst, dtype=torch.long, device=device), persistent=False)


def apply_map(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` [N, in_channels, ...] -> [N, out_channels, ...] through the map ``set_map`` stored on ``m``."""
    out = x.new_zeros(x.shape[0], m.out_channels, *x.shape[2:])
    return out.index_copy(1, m.dst_index, x.index_select(1, m.src_index))


class ChannelMap(nn.Module):
    """Input channel ``src[i]`` lands at output channel ``dst[i]``; every other output channel is zero.

    ``x`` [N, in_channels, ...] -> [N, out_channels, ...], positions along the other axes unchanged.
    ``carfast_channel_map()`` / ``set_channel_map()`` make it a channel-map shortcut to carfast's graph
    code and surgery, like ``carfast.models.OptionAShortcut``.
    """

    def __init__(self, in_channels: int, out_channels: int, src: list[int], dst: list[int]):
        super().__init__()
        set_map(self, in_channels, out_channels, src, dst)

    def carfast_channel_map(self) -> tuple[int, int, list[int], list[int]]:
        """(input channels, output channels, src, dst)."""
        return self.in_channels, self.out_channels, list(self.src), list(self.dst)

    def set_channel_map(self, in_channels: int, out_channels: int, src: list[int], dst: list[int]) -> None:
        """Make input channel src[i] land at output channel dst[i] (the surgery's edit)."""
        set_map(self, in_channels, out_channels, src, dst)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, in_channels, ...] -> [N, out_channels, ...]
        return apply_map(self, x)

    def extra_repr(self) -> str:
        return f"{self.in_channels} -> {self.out_channels}, {len(self.src)} moved"
