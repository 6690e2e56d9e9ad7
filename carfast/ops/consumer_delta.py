"""Consumer delta: the change of a consumer's output when some of its input channels are removed.

A consumer U (Conv2d or Linear, as a module or an ``F.conv2d`` / ``F.linear`` call) is linear in its
input, so U(x without the channels filter k owns) = U(x) - U_k(x_k), where U_k is U restricted to those
input channels. This computes U_k(x_k) for a batch of (filter, image) pairs; all K filters together cost
about one pass of U instead of K.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LayerSpec", "consumer_delta", "owned_weight"]


@dataclass(frozen=True, eq=False)
class LayerSpec:
    """The arithmetic of a consumer. kind "conv": weight [O, I / groups, kh, kw] with the conv's stride,
    padding, dilation, groups and padding mode; kind "linear": weight [O, I] (mixing the last dim)."""
    kind: str
    weight: torch.Tensor
    stride: tuple = (1, 1)
    padding: object = (0, 0)
    dilation: tuple = (1, 1)
    groups: int = 1
    padding_mode: str = "zeros"
    pad_amounts: tuple = ()          # F.pad amounts for a padding mode other than zeros

    @property
    def out_channels(self) -> int:
        return int(self.weight.shape[0])

    @property
    def in_channels(self) -> int:
        return int(self.weight.shape[1]) * (self.groups if self.kind == "conv" else 1)

    @classmethod
    def of_module(cls, m: nn.Module) -> "LayerSpec":
        if isinstance(m, nn.Linear):
            return cls("linear", m.weight)
        pads = tuple(m._reversed_padding_repeated_twice) if m.padding_mode != "zeros" else ()
        return cls("conv", m.weight, tuple(m.stride), m.padding if isinstance(m.padding, str) else tuple(m.padding),
                   tuple(m.dilation), m.groups, m.padding_mode, pads)


def owned_weight(spec: LayerSpec, index: torch.Tensor) -> torch.Tensor:
    """The consumer's weight restricted to input channels ``index`` [w] (along the mixing dim).

    Returns, for a conv with ``groups`` g, [O, w, kh, kw] with the entries of output channels in other
    groups set to zero (so a dense conv over the owned channels is exact); for a linear, [O, w].
    """
    w = spec.weight
    index = index.to(w.device)
    if spec.kind == "linear" or spec.groups == 1:
        return w.index_select(1, index)
    in_per_group = spec.in_channels // spec.groups
    out_per_group = spec.out_channels // spec.groups
    out = w.new_zeros((w.shape[0], len(index)) + tuple(w.shape[2:]))
    for i, ci in enumerate(index.tolist()):
        g = ci // in_per_group
        rows = slice(g * out_per_group, (g + 1) * out_per_group)
        out[rows, i] = w[rows, ci - g * in_per_group]
    return out


def consumer_delta(spec: LayerSpec, owned_input: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """U_k(x_k) for a batch of pairs that all remove the same filter.

    Args:
        spec: the consumer.
        owned_input: the owned channels of the consumer's input, [P, w, H, W] (conv) or [P, ..., w] (linear).
        weight: ``owned_weight(spec, index)``.
    Returns:
        [P, O, Ho, Wo] (conv) or [P, ..., O] (linear), the amount to subtract from the consumer's output
        (bias excluded: removing an input channel leaves the bias in place).
    """
    if spec.kind == "linear":
        return owned_input @ weight.t()
    if spec.padding_mode != "zeros":
        padded = F.pad(owned_input, spec.pad_amounts, mode=spec.padding_mode)
        return F.conv2d(padded, weight, None, spec.stride, 0, spec.dilation)
    return F.conv2d(owned_input, weight, None, spec.stride, spec.padding, spec.dilation)
