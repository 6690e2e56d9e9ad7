"""CIFAR-10 training data for fine-tuning: decode the JPEG-packed training set into tensors.

``cifar10_train(path, n=None, seed=None)`` reads a ``train_jpegq75.npz`` (keys ``jpeg_bytes`` [B] uint8,
all JPEG files concatenated; ``offsets`` [N + 1] int64; ``labels`` [N]; optional ``classes``) and returns
``(inputs [N, 3, 32, 32] float32, labels [N] int64)`` normalised like ``carfast.data.cifar10_test``.
The package does not bundle the training set, so ``path`` is required. Decoding needs Pillow
(``pip install pillow``); only the images asked for are decoded (about 3 s for all 50,000 on one core).
"""
from __future__ import annotations

import io
import os

import numpy as np
import torch

from carfast.data.cifar10 import normalize_images
from carfast.models.cifar import CIFAR_RESNET_NORMALIZATION

__all__ = ["cifar10_train", "decode_jpegs"]

_KEYS = ("jpeg_bytes", "offsets", "labels")
_CHUNK = 2048            # images decoded and normalised at a time


def _pillow(fn: str):
    try:
        from PIL import Image
    except ImportError:
        raise ImportError(f"{fn}: decoding the JPEG training set needs Pillow, which is not installed; "
                          "run `pip install pillow` (or install carfast with the `finetune` extra)") from None
    return Image


def _read_npz(path, fn: str):
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in _KEYS if k not in z.files]
            if missing:
                raise ValueError(f"{fn}: {os.fspath(path)} lacks {missing}; expected jpeg_bytes [B] uint8, "
                                 "offsets [N+1] int64 and labels [N] (the train_jpegq75.npz format)")
            classes = [str(c) for c in z["classes"]] if "classes" in z.files else None
            return z["jpeg_bytes"], z["offsets"].astype(np.int64), z["labels"].astype(np.int64), classes
    except FileNotFoundError:
        raise FileNotFoundError(f"{fn}: no file at {os.fspath(path)}; pass path= to a CIFAR-10 training set "
                                "packed as JPEGs (e.g. shared/data/cifar10/train_jpegq75.npz: jpeg_bytes, "
                                "offsets, labels)") from None


def _check_layout(blob: np.ndarray, offsets: np.ndarray, labels: np.ndarray, path, fn: str) -> None:
    if blob.ndim != 1 or blob.dtype != np.uint8:
        raise ValueError(f"{fn}: {os.fspath(path)}: jpeg_bytes must be a 1-D uint8 array, got "
                         f"{blob.dtype} {blob.shape}")
    if labels.ndim != 1 or offsets.shape != (len(labels) + 1,):
        raise ValueError(f"{fn}: {os.fspath(path)}: offsets must be [N+1] for labels [N], got offsets "
                         f"{offsets.shape} and labels {labels.shape}")
    if len(labels) == 0:
        raise ValueError(f"{fn}: {os.fspath(path)} holds no images")
    if offsets[0] < 0 or offsets[-1] > len(blob) or bool((np.diff(offsets) <= 0).any()):
        raise ValueError(f"{fn}: {os.fspath(path)}: offsets must increase strictly from >= 0 to at most "
                         f"len(jpeg_bytes) = {len(blob)}; the file is damaged")
    if labels.min() < 0:
        raise ValueError(f"{fn}: {os.fspath(path)}: negative label {int(labels.min())}")


def decode_jpegs(blob, offsets, indices, size=(32, 32), fn: str = "decode_jpegs") -> np.ndarray:
    """Decode images ``indices`` of a packed JPEG blob: uint8 [len(indices), H, W, 3] RGB, ``size=(H, W)``.

    ``blob``: [B] uint8 array or ``bytes`` (pass bytes when calling repeatedly, to save a copy each
    call); ``offsets``: [N + 1] ints; image ``i`` is ``blob[offsets[i]:offsets[i + 1]]``. The fast
    path hands the bytes straight to Pillow's JPEG decoder at the expected size (no header parsing in
    Python, ~60 us an image); an image it cannot take (another size, CMYK, ...) goes through
    ``Image.open`` and must then be ``size``.
    """
    Image = _pillow(fn)
    h, w = size
    buf = blob if isinstance(blob, bytes) else np.asarray(blob, dtype=np.uint8).tobytes()  # bytes slice fast
    offs = offsets if isinstance(offsets, list) else np.asarray(offsets).tolist()
    out = np.empty((len(indices), h, w, 3), dtype=np.uint8)
    for j, i in enumerate(np.asarray(indices, dtype=np.int64).tolist()):
        data = buf[offs[i]:offs[i + 1]]
        try:
            img = Image.frombytes("RGB", (w, h), data, "jpeg", "RGB", "")
        except (ValueError, OSError):
            img = _decode_slow(Image, data, i, size, fn)
        out[j] = np.asarray(img)
    return out


def _decode_slow(Image, data: bytes, i: int, size, fn: str):
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as err:   # Pillow raises several types for corrupt data
        raise ValueError(f"{fn}: image {i} is not a readable JPEG ({err}); the file is damaged") from None
    if img.size != (size[1], size[0]):
        raise ValueError(f"{fn}: image {i} is {img.size[0]}x{img.size[1]} pixels, expected "
                         f"{size[1]}x{size[0]}; the loader expects CIFAR-sized images")
    return img.convert("RGB")


def _balanced_order(labels: np.ndarray, seed: int | None) -> np.ndarray:
    """Indices ordered so that any prefix is class-balanced to within one: image ``k`` of each class
    (file order, or a seeded random order within each class) comes before image ``k + 1`` of any class."""
    rank = np.zeros(len(labels), dtype=np.int64)
    rng = np.random.default_rng(seed) if seed is not None else None
    for c in np.unique(labels):
        where = np.flatnonzero(labels == c)
        rank[where] = rng.permutation(len(where)) if rng is not None else np.arange(len(where))
    return np.lexsort((labels, rank))       # by rank, then by class


def cifar10_train(path: str | os.PathLike, n: int | None = None, *, normalization=CIFAR_RESNET_NORMALIZATION,
                  seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 training images and labels, decoded from a JPEG-packed ``.npz``.

    Args:
        path: the packed training set, e.g. ``shared/data/cifar10/train_jpegq75.npz`` (required: the
            package does not bundle it).
        n: take this many images (default all, in file order). A class-balanced subset: every class
            gives ``n // C`` images and the first ``n % C`` classes one more (while every class has
            enough; a class that runs out leaves its share to the others); the order interleaves
            the classes (image ``i`` has class ``i % C`` while every class has images left).
        normalization: ``(mean, std)`` per RGB channel of the [0, 1] input; default the pretrained
            ResNets' (pass ``carfast.models.ALEXNET_CIFAR_NORMALIZATION`` for the AlexNet-style net).
        seed: which images of each class the subset takes: None takes the first ones in file order,
            an int a random choice that is the same for the same seed.
    Returns:
        inputs: [N, 3, 32, 32] float32, normalised; labels: [N] int64.
    """
    fn = "cifar10_train"
    if path is None:
        raise TypeError(f"{fn}: path is required (the training set is not bundled); pass e.g. "
                        "path='shared/data/cifar10/train_jpegq75.npz'")
    if n is not None and (isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1):
        raise ValueError(f"{fn}: n must be a positive int or None for all images, got {n!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
        raise TypeError(f"{fn}: seed must be an int or None, got {type(seed).__name__}")
    _pillow(fn)                                  # fail before reading 50 MB if Pillow is missing
    blob, offsets, labels, _ = _read_npz(path, fn)
    _check_layout(blob, offsets, labels, path, fn)
    if n is None:
        chosen = np.arange(len(labels))
    else:
        if n > len(labels):
            raise ValueError(f"{fn}: asked for n={n} images but {os.fspath(path)} holds {len(labels)}")
        chosen = _balanced_order(labels, seed)[:n]
    # decode and normalise in chunks: the float32 result (600 MB for 50,000 images) is the only big buffer
    inputs = torch.empty((len(chosen), 3, 32, 32), dtype=torch.float32)
    buf, offs = blob.tobytes(), offsets.tolist()
    for start in range(0, len(chosen), _CHUNK):
        part = chosen[start:start + _CHUNK]
        inputs[start:start + len(part)] = normalize_images(decode_jpegs(buf, offs, part, fn=fn), normalization)
    return inputs, torch.from_numpy(labels[chosen].copy())
