"""Consumer delta: the change of a consumer's output when some of its input channels are removed.

A consumer U (Conv2d or Linear) is linear in its input, so U(x without channel k) = U(x) - U_k(x_k),
where U_k is U restricted to the input channels that filter k owns. This computes U_k(x_k) for a
batch of (filter, image) pairs; all K filters together cost about one pass of U instead of K.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["consumer_delta", "owned_weight"]


def owned_weight(consumer: nn.Module, first: int, width: int) -> torch.Tensor:
    """The consumer's weight restricted to input channels ``[first, first + width)``.

    Returns, for a Conv2d with ``groups`` g, [O, width, kh, kw] with the entries of output channels in
    other groups set to zero (so a dense conv over the owned channels is exact); for a Linear,
    [O, width].
    """
    w = consumer.weight
    if isinstance(consumer, nn.Linear):
        return w[:, first:first + width]
    groups = consumer.groups
    in_per_group = consumer.in_channels // groups
    out_per_group = consumer.out_channels // groups
    if groups == 1:
        return w[:, first:first + width]
    out = w.new_zeros((w.shape[0], width) + tuple(w.shape[2:]))
    for i in range(width):
        ci = first + i
        g = ci // in_per_group
        rows = slice(g * out_per_group, (g + 1) * out_per_group)
        out[rows, i] = w[rows, ci - g * in_per_group]
    return out


def consumer_delta(consumer: nn.Module, owned_input: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """U_k(x_k) for a batch of pairs that all remove the same filter.

    Args:
        consumer: the Conv2d or Linear.
        owned_input: the owned slice of the consumer's input, [P, width, H, W] (conv) or [P, width] (linear).
        weight: ``owned_weight(consumer, first, width)``.
    Returns:
        [P, O, Ho, Wo] (conv) or [P, O] (linear), the amount to subtract from the consumer's output
        (bias excluded: removing an input channel leaves the bias in place).
    """
    if isinstance(consumer, nn.Linear):
        return owned_input @ weight.t()
    if consumer.padding_mode != "zeros":
        padded = F.pad(owned_input, consumer._reversed_padding_repeated_twice, mode=consumer.padding_mode)
        return F.conv2d(padded, weight, None, consumer.stride, 0, consumer.dilation)
    return F.conv2d(owned_input, weight, None, consumer.stride, consumer.padding, consumer.dilation)
