"""Images and labels from an ``.npz`` file: ``x`` (uint8 images [N, H, W, C], or float inputs [N, ...]),
``y`` (int labels [N]) and, optionally, ``classes`` (the class names)."""
from __future__ import annotations

import os

import numpy as np
import torch

__all__ = ["read_npz", "load_npz"]

_FORMAT = "keys x (uint8 images [N, H, W, C] or float inputs [N, ...]), y (int labels [N]), optional classes"


def read_npz(path: str | os.PathLike, fn: str) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """(x, y, class names or None) as stored; errors name the file and the expected keys."""
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("x", "y") if k not in z.files]
            if missing:
                raise ValueError(f"{fn}: {os.fspath(path)} lacks key(s) {missing} (it has {z.files}); expected "
                                 f"{_FORMAT}")
            classes = [str(c) for c in z["classes"]] if "classes" in z.files else None
            return z["x"], z["y"], classes
    except FileNotFoundError:
        raise FileNotFoundError(f"{fn}: no file at {os.fspath(path)}; pass an .npz with {_FORMAT}") from None
    except (OSError, EOFError) as err:   # not an npz (np.load's own message is about pickles)
        raise ValueError(f"{fn}: {os.fspath(path)} is not an .npz file ({type(err).__name__}); expected "
                         f"{_FORMAT}") from None


def load_npz(path: str | os.PathLike, normalization=None, fn: str = "load_npz"):
    """(x [N, ...] float32, y [N] int64, class names or None) from an ``.npz`` file.

    uint8 ``x`` [N, H, W, C] becomes [N, C, H, W], scaled to [0, 1], then ``(x - mean) / std`` per channel
    when ``normalization`` is ``(mean, std)``; float ``x`` is taken as the model's input as it is.
    """
    x, y, classes = read_npz(path, fn)
    if not np.issubdtype(y.dtype, np.integer) or y.ndim != 1 or len(y) != len(x):
        raise ValueError(f"{fn}: {os.fspath(path)}: y must be int labels [N] for the {len(x)} inputs, got "
                         f"{y.dtype} {list(y.shape)}")
    if len(y) == 0:
        raise ValueError(f"{fn}: {os.fspath(path)} holds no images")
    if x.dtype == np.uint8:
        if x.ndim != 4:
            raise ValueError(f"{fn}: {os.fspath(path)}: uint8 x must be images [N, H, W, C], got {list(x.shape)}")
        t = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float().div_(255)
        if normalization is not None:
            mean, std = (torch.tensor(v, dtype=torch.float32) for v in normalization)
            if mean.numel() != t.shape[1]:
                raise ValueError(f"{fn}: the normalisation has {mean.numel()} channels, the images {t.shape[1]}")
            t = (t - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
        x_t = t.contiguous()
    elif np.issubdtype(x.dtype, np.floating):
        x_t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    else:
        raise ValueError(f"{fn}: {os.fspath(path)}: x is {x.dtype}; expected uint8 images or float inputs")
    return x_t, torch.from_numpy(y.astype(np.int64)), classes
