"""CIFAR-10 test data: the class-balanced 2,000-image slice bundled with carfast, or a full copy.

``cifar10_test(n=None, path=None)`` returns ``(inputs [N, 3, 32, 32] float32, labels [N] int64)``,
RGB in [0, 1] normalised for the pretrained ResNets (pass ``normalization=`` for another network).
"""
from __future__ import annotations

import os
from importlib import resources

import numpy as np
import torch

from carfast.data.arrays import read_npz
from carfast.models.cifar import CIFAR_RESNET_NORMALIZATION

__all__ = ["cifar10_test", "cifar10_classes", "normalize_images"]

_SLICE = "cifar10_test_2000.npz"


def _read_npz(path):
    return read_npz(path, "cifar10_test")


def normalize_images(x_uint8_nhwc: np.ndarray, normalization=CIFAR_RESNET_NORMALIZATION) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float32 [N, 3, H, W], scaled to [0, 1] then (x - mean) / std per channel."""
    mean, std = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in normalization)
    x = torch.from_numpy(np.ascontiguousarray(x_uint8_nhwc)).permute(0, 3, 1, 2).float().div_(255)
    return ((x - mean) / std).contiguous()


def cifar10_test(n: int | None = None, path: str | os.PathLike | None = None,
                 normalization=CIFAR_RESNET_NORMALIZATION) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 test images and labels.

    Args:
        n: take this many images (default all); from the bundled slice, the first ``n`` of a
           class-balanced order (image ``i`` has class ``i % 10``), so any ``n`` is balanced to within one.
        path: a full ``test.npz`` (x, y) to read instead of the bundled 2,000-image slice; its first
            ``n`` images in file order.
    Returns:
        inputs: [N, 3, 32, 32] float32, normalised; labels: [N] int64.
    """
    if path is None:
        with resources.as_file(resources.files("carfast.assets") / _SLICE) as p:
            x, y, _ = _read_npz(p)
        order = np.argsort(_rank_within_class(y) * 10 + y, kind="stable")
        x, y = x[order], y[order]
    else:
        x, y, _ = _read_npz(path)
    if n is not None:
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"cifar10_test: n must be a positive int, got {n!r}")
        if n > len(y):
            raise ValueError(f"cifar10_test: asked for n={n} images but the source holds {len(y)}; "
                             "pass path= to the full test set for more")
        x, y = x[:n], y[:n]
    return normalize_images(x, normalization), torch.from_numpy(y.astype(np.int64))


def _rank_within_class(y: np.ndarray) -> np.ndarray:
    rank = np.zeros(len(y), dtype=np.int64)
    for c in np.unique(y):
        where = np.flatnonzero(y == c)
        rank[where] = np.arange(len(where))
    return rank


def cifar10_classes() -> list[str]:
    """The ten CIFAR-10 class names, index order."""
    with resources.as_file(resources.files("carfast.assets") / _SLICE) as p:
        return _read_npz(p)[2]
