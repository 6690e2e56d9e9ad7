"""Images and labels from an ``.npz`` file: ``x`` (uint8 images [N, H, W, C], or float inputs [N, ...]),
``y`` (int labels [N]) and, optionally, ``classes`` (the class names)."""
from __future__ import annotations

import os
import zipfile

import numpy as np
import torch

__all__ = ["read_npz", "load_npz", "to_tensors"]

_FORMAT = "keys x (uint8 images [N, H, W, C] or float inputs [N, ...]), y (int labels [N]), optional classes"


def read_npz(path: str | os.PathLike, fn: str) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """(x, y, class names or None) as stored; errors name the file and the expected keys."""
    where = os.fspath(path)
    try:
        z = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"{fn}: no file at {where}; pass an .npz with {_FORMAT}") from None
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as err:
        # not an npz: numpy's own message for a text file is about pickled data
        raise ValueError(f"{fn}: {where} is not an .npz file (not a numpy zip archive: {type(err).__name__}); save "
                         f"one with numpy.savez(path, x=..., y=...): {_FORMAT}") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise ValueError(f"{fn}: {where} holds one array ({getattr(z, 'dtype', '?')} {list(getattr(z, 'shape', []))})"
                         f", not an .npz; save one with numpy.savez(path, x=..., y=...): {_FORMAT}")
    with z:
        missing = [k for k in ("x", "y") if k not in z.files]
        if missing:
            raise ValueError(f"{fn}: {where} lacks key(s) {missing} (it has {z.files}); expected {_FORMAT}")
        try:
            classes = [str(c) for c in z["classes"]] if "classes" in z.files else None
            return z["x"], z["y"], classes
        except ValueError as err:      # object arrays (allow_pickle=False), a truncated member
            raise ValueError(f"{fn}: {where}: numpy cannot read its arrays without unpickling ({err}); store x, y "
                             "and classes as numeric / string arrays (numpy.savez with plain arrays)") from None
        except (OSError, EOFError, zipfile.BadZipFile) as err:
            raise ValueError(f"{fn}: {where} is damaged (numpy cannot read it: {type(err).__name__}); write it "
                             "again") from None


def load_npz(path: str | os.PathLike, normalization=None, fn: str = "load_npz"):
    """(x [N, ...] float32, y [N] int64, class names or None) from an ``.npz`` file.

    uint8 ``x`` [N, H, W, C] becomes [N, C, H, W], scaled to [0, 1], then ``(x - mean) / std`` per channel
    when ``normalization`` is ``(mean, std)``; float ``x`` is taken as the model's input as it is.
    """
    return to_tensors(*read_npz(path, fn), path, normalization, fn)


def to_tensors(x: np.ndarray, y: np.ndarray, classes, path, normalization=None, fn: str = "load_npz"):
    """``load_npz`` of arrays already read by ``read_npz`` (``path`` names the file in errors)."""
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
