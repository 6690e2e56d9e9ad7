"""First-layer filters as pictures, and how colour-selective each one is.

A conv layer that reads the RGB image (weight ``[F, 3, kh, kw]``) can be looked at: each filter is a
small colour patch. Two helpers, both pure functions of the weights:

- ``filter_tiles(weight)``: ``[F, kh, kw, 3]`` float64 in [0, 1] for display. Each filter is scaled on
  its own (per-filter contrast normalisation) and symmetrically about zero: ``0.5 + 0.5 * w / max|w|``,
  so a zero weight is mid-grey, the filter's strongest weight is black or full colour, and the sign
  (an opponent pair such as red-vs-green) stays visible. An all-zero filter is uniform grey.
- ``colour_selectivity(weight)``: ``[F]`` float64 in [0, 1], how much of a filter's weight lies along
  colour rather than brightness. At every kernel position the filter's RGB weight vector ``w = (r, g,
  b)`` is split into its projection on the luminance axis ``u = (1, 1, 1) / sqrt(3)`` (the part that
  responds to brightness: ``(w . u) u``) and the rest (the chromatic part, orthogonal to ``u``: it sums
  to zero over the channels, so it responds only to colour differences). The index is the chromatic
  energy over the total energy, summed over the kernel positions:

      index = sum_pos |w - (w . u) u|^2 / sum_pos |w|^2

  0 for a grey filter (r = g = b at every position: a luminance-only edge or blob detector), 1 for a
  pure colour-opponent filter (r + g + b = 0 at every position, e.g. red minus green), 2/3 for a filter
  that reads one channel only (pure red). An all-zero filter has index 0 (no colour preference).

The CAR paper (Abbasi-Asl and Yu) observes that greedy CAR pruning removes colour-selective
first-layer filters first; this index makes that checkable (``page.py`` compares removed and kept
filters). Both functions take ``input_std``: the per-channel std the network's input was normalised
with. Weights applied to ``(x - mean) / std`` act on the raw RGB image as ``w / std``; pass it to look
at (and measure) the filters in raw RGB terms. It changes little for CIFAR's near-equal stds.
"""
from __future__ import annotations

import math

import torch

__all__ = ["filter_tiles", "colour_selectivity"]


def _rgb_weight(weight, input_std, fn: str) -> torch.Tensor:
    """``weight`` as float64 [F, 3, kh, kw] on the CPU, divided by ``input_std`` per channel if given."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{fn}: weight must be a tensor [F, 3, kh, kw], got {type(weight).__name__}")
    if weight.dim() != 4 or weight.shape[1] != 3:
        raise ValueError(f"{fn}: weight must be [F, 3, kh, kw] (a conv reading an RGB image), got shape "
                         f"{tuple(weight.shape)}; pass the weight of a first layer with 3 input channels")
    w = weight.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{fn}: weight holds NaN or inf values; pass finite weights")
    if input_std is not None:
        std = torch.as_tensor(input_std, dtype=torch.float64).flatten()
        if std.numel() != 3 or not bool((std > 0).all()):
            raise ValueError(f"{fn}: input_std must be 3 positive numbers (R, G, B), got {input_std!r}")
        w = w / std.view(1, 3, 1, 1)
    return w


def filter_tiles(weight: torch.Tensor, input_std=None) -> torch.Tensor:
    """Display tiles of RGB filters.

    Args:
        weight: [F, 3, kh, kw] conv weight of a layer reading the RGB image.
        input_std: optional (3,) per-channel std of the input normalisation (see the module doc).
    Returns:
        [F, kh, kw, 3] float64 in [0, 1]: ``0.5 + 0.5 * w / max|w|`` per filter (zero weight = grey).
    """
    w = _rgb_weight(weight, input_std, "filter_tiles")
    scale = w.abs().flatten(1).amax(1).view(-1, 1, 1, 1)
    tiles = 0.5 + 0.5 * torch.where(scale > 0, w / scale.clamp(min=1e-300), torch.zeros_like(w))
    return tiles.permute(0, 2, 3, 1).clamp(0.0, 1.0).contiguous()


def colour_selectivity(weight: torch.Tensor, input_std=None) -> torch.Tensor:
    """Colour-selectivity index of RGB filters (see the module doc for the definition).

    Args:
        weight: [F, 3, kh, kw] conv weight of a layer reading the RGB image.
        input_std: optional (3,) per-channel std of the input normalisation.
    Returns:
        [F] float64 in [0, 1]: chromatic energy / total energy; 0 = grey (luminance only), 1 = pure colour
        opponent; 0 for an all-zero filter.
    """
    w = _rgb_weight(weight, input_std, "colour_selectivity")
    total = w.pow(2).sum((1, 2, 3))
    luminance = (w.sum(1) / math.sqrt(3.0)).pow(2).sum((1, 2))   # (w . u)^2 summed over positions
    chromatic = (total - luminance).clamp(min=0.0)
    return torch.where(total > 0, chromatic / total.clamp(min=1e-300), torch.zeros_like(total)).clamp(0.0, 1.0)
