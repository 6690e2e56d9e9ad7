"""Data augmentation of the fine-tune: ``random_crop_flip``, done in torch on each batch."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["random_crop_flip", "black_fill"]


def black_fill(normalization) -> tuple:
    """The per-channel value of a black pixel after ``normalization`` = ((mean...), (std...)): ``-mean / std``,
    the ``fill`` of ``random_crop_flip`` (``FinetuneConfig.pad_fill``) that pads as torchvision's ``RandomCrop``."""
    mean, std = normalization
    return tuple(-m / s for m, s in zip(mean, std))


def random_crop_flip(x: torch.Tensor, padding: int = 4, generator: torch.Generator | None = None,
                     fill=None) -> torch.Tensor:
    """Per image, a random H x W crop of ``x`` padded by ``padding`` and a random horizontal flip.

    x: [N, C, H, W] float -> [N, C, H, W] (a new tensor). ``fill`` None pads by reflection, which keeps the
    border in the image's own colours whatever the normalisation (images smaller than ``padding + 1``
    pixels are zero-padded instead); a number, or one per channel, pads with that constant, in the units
    of ``x``: torchvision's ``RandomCrop(32, padding=4)`` pads with black, i.e. ``-mean / std`` per
    channel after normalisation. Randomness from ``generator`` (drawn
    on the CPU, so results match across devices).
    """
    if x.dim() != 4:
        raise ValueError(f"random_crop_flip: expected images [N, C, H, W], got shape {tuple(x.shape)}; "
                         "pass augment=False for non-image inputs")
    n, c, h, w = x.shape
    if fill is None:
        padded = F.pad(x, (padding,) * 4, mode="reflect" if min(h, w) > padding else "constant")
    else:
        value = torch.as_tensor(fill, dtype=x.dtype, device=x.device).reshape(-1, 1, 1)
        if value.shape[0] not in (1, c):
            raise ValueError(f"random_crop_flip: fill has {value.shape[0]} values for {c} channels; pass one "
                             "number or one per channel")
        padded = value.expand(c, h + 2 * padding, w + 2 * padding).repeat(n, 1, 1, 1)
        padded[:, :, padding:padding + h, padding:padding + w] = x
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(x.device)
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]          # [N, 1, H, 1]
    cols = dx[:, None] + torch.arange(w, device=x.device)                             # [N, W]
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, None, :]           # [N, 1, 1, W]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, chans, rows, cols]
