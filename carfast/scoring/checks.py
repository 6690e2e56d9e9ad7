"""The engine's argument checks and sizing helpers: filters, backend, device copy, image count, bytes."""
from __future__ import annotations

import copy

import torch
from torch import nn

from carfast import extensions
from carfast.batching import model_device

__all__ = ["check_filters", "pick_backend", "work_model", "count_images", "nbytes", "meta_bytes", "near_chance",
           "warn_near_chance", "NEAR_CHANCE_MIN_IMAGES"]

_FN = "score_layer"
_BACKENDS = ("auto", *reversed(extensions.BACKENDS))      # auto, torch, cpu, triton, cuda


def check_filters(filters, num: int, name: str, fn: str = _FN) -> torch.Tensor:
    """[F] int64 filter indices from ``filters`` (None: all ``num``), checked; ``fn`` names the caller."""
    if filters is None:
        return torch.arange(num)
    f = torch.as_tensor(filters)
    if f.numel() == 0:
        raise ValueError(f"{fn}: filters is empty; pass None to score all {num} filters")
    if f.dim() != 1 or f.dtype.is_floating_point or f.dtype == torch.bool:
        raise TypeError(f"{fn}: filters must be a 1-D list of int filter indices, got {filters!r}")
    f = f.long()
    bad = f[(f < 0) | (f >= num)]
    if bad.numel():
        raise ValueError(f"{fn}: filter {int(bad[0])} is out of range: layer {name!r} has {num} filters "
                         f"(0..{num - 1})")
    if f.unique().numel() != f.numel():
        dup = [int(v) for v in f.unique() if int((f == v).sum()) > 1]
        raise ValueError(f"{fn}: filters repeat {dup[:5]}; list each filter once")
    return f


def pick_backend(backend: str, device: torch.device, fn: str = _FN) -> str:
    if backend not in _BACKENDS:
        raise ValueError(f"{fn}: backend {backend!r} unknown; choose one of {', '.join(_BACKENDS)}")
    if backend == "auto":
        if device.type == "cuda":
            return next((b for b in ("cuda", "triton") if extensions.has_backend(b)), "torch")
        return "cpu" if device.type == "cpu" and extensions.has_backend("cpu") else "torch"
    if backend != "torch":
        extensions.require_backend(backend)
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"{fn}: backend 'cpu' runs on the CPU but the model is on {device}; pass device='cpu' "
                         "or backend='auto'")
    if backend == "cuda" and device.type != "cuda":
        raise ValueError(f"{fn}: backend 'cuda' runs on a CUDA device but the model is on {device}; pass "
                         "device='cuda' or backend='auto'")
    return backend


def work_model(model: nn.Module, device) -> tuple[nn.Module, torch.device]:
    home = model_device(model)
    if device is None or torch.device(device) == home:
        return model, home
    return copy.deepcopy(model).to(device), torch.device(device)  # never move the user's model


def count_images(data) -> int | None:
    """Number of images in ``data`` when it is known without reading it (tuple of tensors, DataLoader)."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor) \
            and isinstance(data[1], torch.Tensor):
        return int(data[0].shape[0])
    dataset = getattr(data, "dataset", None)
    try:
        return len(dataset) if dataset is not None else None
    except TypeError:
        return None


def nbytes(shape, dtype=torch.float32) -> int:
    """Bytes of one image's slice of a tensor of ``shape`` (batch dim excluded)."""
    n = 1
    for s in shape[1:]:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()


def meta_bytes(nodes) -> list[int]:
    return [nbytes(n.meta["tensor_meta"].shape, n.meta["tensor_meta"].dtype) for n in nodes
            if hasattr(n.meta.get("tensor_meta"), "shape")]


#: images below which near-chance accuracy is not flagged (too few to tell a network from guessing)
NEAR_CHANCE_MIN_IMAGES = 100


def near_chance(accuracy: float, num_images: int, num_classes: int, topk: int = 1) -> bool:
    """Whether ``accuracy`` (top-``topk``, a fraction) on ``num_images`` images is near chance.

    Chance is ``topk / num_classes``; near means at most chance + min(chance / 2, 5 points): 1.5 / C for
    C >= 10 classes (15 % for CIFAR-10), tighter below (55 % for two classes), and only on at least
    ``NEAR_CHANCE_MIN_IMAGES`` images, enough to tell (CIFAR-10 guessing on 100 images: 10 +- 3 %).
    """
    if num_images < NEAR_CHANCE_MIN_IMAGES or num_classes < 2:
        return False
    chance = min(topk, num_classes) / num_classes
    if chance >= 1.0:
        return False
    return accuracy <= chance + min(chance / 2, 0.05)


def warn_near_chance(accuracy: float, num_images: int, num_classes: int, fn: str, topk: int = 1,
                     what: str = "the scoring data", stacklevel: int = 3) -> bool:
    """Warn (``errors.NearChanceWarning``) when the intact model's accuracy on ``what`` is near chance
    (``near_chance``), naming the likely causes; returns whether it warned. Callers warn once per call;
    ``stacklevel`` counts from this function's caller's caller (3: the caller of the function calling this)."""
    if not near_chance(accuracy, num_images, num_classes, topk):
        return False
    import warnings

    from carfast.errors import NearChanceWarning
    name = "accuracy" if topk == 1 else f"top-{topk} accuracy"
    chance = min(topk, num_classes) / num_classes
    warnings.warn(f"{fn}: the model's {name} on {what} is {100 * accuracy:.2f} % ({num_images:,} images), near "
                  f"chance ({100 * chance:.2f} % for {num_classes} classes): check that its trained weights are "
                  "loaded, that the inputs are normalised as in its training, and that the labels follow its class "
                  "order (y indexes its outputs); scores of a near-chance network say little",
                  NearChanceWarning, stacklevel=stacklevel)
    return True
