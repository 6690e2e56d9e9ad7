"""Input handling for scoring: data validation and re-chunking, eval mode, memory budget."""
from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterable, Iterator

import torch
from torch import nn

__all__ = ["model_device", "model_dtype", "eval_mode", "as_batches", "check_batch", "check_topk", "iter_chunks",
           "default_memory_budget", "check_labels", "check_work_sizes", "check_finite"]


def model_device(model: nn.Module) -> torch.device:
    """Where ``model`` lives: the device of its first parameter or buffer (CPU when it has neither)."""
    p = next(itertools.chain(model.parameters(), model.buffers()), None)
    return p.device if p is not None else torch.device("cpu")


def model_dtype(model: nn.Module, fn: str) -> torch.dtype:
    """The floating dtype of ``model``'s parameters: float32, which carfast computes in; ValueError otherwise."""
    p = next((t for t in itertools.chain(model.parameters(), model.buffers()) if t.is_floating_point()), None)
    if p is not None and p.dtype != torch.float32:
        raise ValueError(f"{fn}: the model's parameters are {p.dtype}; carfast scores float32 models (low "
                         "precision is its precision= option): pass a float32 copy, copy.deepcopy(model).float()")
    return torch.float32


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Put every module in eval mode and restore each module's own ``training`` flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def _to_tensor(v):
    """numpy arrays (and lists of labels) as tensors; anything else unchanged."""
    if type(v).__module__ == "numpy" and hasattr(v, "shape"):
        return torch.from_numpy(v) if hasattr(v, "dtype") and v.dtype != object else torch.as_tensor(v)
    return v


def as_batches(data, fn: str, batch_size: int = 256) -> Iterable:
    """``data`` as an iterable of (inputs, labels) batches: a pair of tensors or numpy arrays is one batch;
    a ``torch.utils.data.Dataset`` (map-style, e.g. a ``TensorDataset``, or iterable) is batched here
    (``batch_size`` items, in order); anything else must be an iterable of batches (a DataLoader)."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(
            isinstance(_to_tensor(t), torch.Tensor) for t in data):
        return [tuple(_to_tensor(t) for t in data)]
    if isinstance(_to_tensor(data), torch.Tensor):
        raise TypeError(f"{fn}: data must be (inputs, labels) or an iterable of (inputs, labels) batches, "
                        "got a single tensor or array; pass the labels too")
    if isinstance(data, torch.utils.data.Dataset) and not isinstance(data, (list, tuple)):
        return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
    if not isinstance(data, Iterable):
        raise TypeError(f"{fn}: data must be (inputs, labels) or an iterable of (inputs, labels) batches "
                        f"(e.g. a DataLoader or a Dataset), got {type(data).__name__}")
    return data


def check_work_sizes(batch_size, memory_budget, fn: str) -> None:
    """ValueError unless ``batch_size`` is None or a positive int and ``memory_budget`` None or a positive
    number of bytes."""
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"{fn}: batch_size must be a positive int, got {batch_size!r}")
    if memory_budget is not None and (isinstance(memory_budget, bool) or
                                      not isinstance(memory_budget, (int, float)) or memory_budget <= 0):
        raise ValueError(f"{fn}: memory_budget must be a positive number of bytes, got {memory_budget!r}")


def check_batch(batch, fn: str, dtype: torch.dtype | None = None):
    """(inputs, labels int64) of one batch, checked; floating inputs in ``dtype`` when given."""
    if isinstance(batch, dict):
        raise TypeError(f"{fn}: a batch is a dict (keys {sorted(map(str, batch))[:4]}); pass (inputs, labels) "
                        "pairs, e.g. ((b['image'], b['label']) for b in loader)")
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        batch = [_to_tensor(batch[0]), _to_tensor(batch[1])]
        if not isinstance(batch[1], torch.Tensor) and isinstance(batch[1], (int, list)):
            batch[1] = torch.as_tensor(batch[1])
    if not (isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[0], torch.Tensor)
            and isinstance(batch[1], torch.Tensor)):
        raise TypeError(f"{fn}: each batch must be a pair (inputs, labels) of tensors or numpy arrays, got "
                        f"{type(batch).__name__}")
    x, y = batch[0], batch[1]
    if y.dim() == 0 and x.dim() >= 1:            # one item of a Dataset batched by hand
        x, y = x.unsqueeze(0), y.reshape(1)
    if y.dim() != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"{fn}: inputs and labels differ in length: inputs {tuple(x.shape)}, labels "
                         f"{tuple(y.shape)}; labels must be [N] class indices matching inputs [N, ...]")
    if y.dtype.is_floating_point or y.dtype == torch.bool or y.is_complex():
        raise TypeError(f"{fn}: labels must be integer class indices, got dtype {y.dtype}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{fn}: inputs are {x.dtype} (images as bytes?); the model computes in floating point: "
                        "convert and normalise them as it expects, e.g. (x.float() / 255 - mean) / std")
    if dtype is not None and x.dtype != dtype:
        x = x.to(dtype)
    return x, y


def iter_chunks(data, chunk: int, device, fn: str = "score_layer",
                dtype: torch.dtype | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (x [n, ...], y [n] int64) on ``device`` with n == ``chunk`` except the last, from any batching
    (``as_batches``); floating inputs in ``dtype`` when given (the model's).

    Raises ValueError for empty data or mismatched lengths.
    """
    pending_x, pending_y, count, seen = [], [], 0, 0
    for batch in as_batches(data, fn):
        x, y = check_batch(batch, fn, dtype)
        seen += x.shape[0]
        while x.shape[0]:
            take = min(chunk - count, x.shape[0])
            pending_x.append(x[:take])
            pending_y.append(y[:take])
            x, y, count = x[take:], y[take:], count + take
            if count == chunk:
                yield _join(pending_x, pending_y, device)
                pending_x, pending_y, count = [], [], 0
    if count:
        yield _join(pending_x, pending_y, device)
    if seen == 0:
        raise ValueError(f"{fn}: data holds no images; pass at least one (inputs, labels) pair")


def _join(xs, ys, device):
    x = xs[0] if len(xs) == 1 else torch.cat(xs)
    y = ys[0] if len(ys) == 1 else torch.cat(ys)
    return x.to(device, non_blocking=True), y.to(device=device, dtype=torch.long)


def check_labels(y: torch.Tensor, num_classes: int, fn: str) -> None:
    bad = (y < 0) | (y >= num_classes)
    if bool(bad.any()):
        raise ValueError(f"{fn}: label {int(y[bad][0])} is outside the model's {num_classes} classes "
                         f"(0..{num_classes - 1}); check the labels or the model's output size")


def check_topk(topk, fn: str, num_classes: int | None = None) -> int:
    """``topk`` if it is an int >= 1 (and below ``num_classes`` when given), else an error naming the fix."""
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"{fn}: topk must be an int >= 1 (1: top-1 accuracy, 5: top-5), got {topk!r}")
    if num_classes is not None and topk >= num_classes:
        raise ValueError(f"{fn}: topk={topk} with a model of {num_classes} classes counts every image correct; "
                         f"pass topk < {num_classes}")
    return topk


def check_finite(logits: torch.Tensor, fn: str, what: str = "the model's output") -> None:
    if not bool(torch.isfinite(logits).all()):
        rows = (~torch.isfinite(logits)).any(1).nonzero().flatten()[:5].tolist()
        raise ValueError(f"{fn}: {what} is not finite (NaN or inf) for images at chunk positions {rows}; check "
                         "the model's weights and the input normalisation")


def default_memory_budget(device: torch.device) -> int:
    """A quarter of free host memory (at most 8 GiB) on CPU; half of free device memory on CUDA."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    avail = None
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    if avail is None:
        avail = 8 << 30
    return int(min(avail // 4, 8 << 30))
