"""How big and how fast a network is: parameters, multiply-accumulates and latency per forward.

Used to report what pruning saves (``surgery.remove_filters`` makes the network physically smaller).

- ``count_params(model)``: every distinct parameter element (tied weights once); buffers (BatchNorm
  running statistics) are not parameters and are not counted.
- ``count_macs(model, example)``: multiply-accumulates of the weights of every Conv1d/2d/3d (any
  groups, depthwise included) and Linear, per input item, measured by forward hooks on one pass over
  ``example`` (so only layers that run count, and a module called twice counts twice). A conv output
  element costs in_channels / groups * kernel elements; a Linear output element in_features. Not
  counted: bias additions, BatchNorm (foldable into the conv before it), activations, pooling, adds,
  and functional matmuls / convs outside modules. A module of a registered type whose handler defines
  ``macs`` counts what that says, and its submodules are not counted again.
- ``latency(model, example)``: median wall-clock seconds of one forward of ``example``.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from carfast.batching import eval_mode
from carfast.graph.registry import defines, user_handler

__all__ = ["ModelStats", "count_params", "count_macs", "latency"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _check(model, example, fn: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be a torch.nn.Module, got {type(model).__name__}")
    if example is not None and (not isinstance(example, torch.Tensor) or example.dim() < 1 or example.shape[0] < 1):
        raise TypeError(f"{fn}: example must be an input tensor [N, ...] with N >= 1, got "
                        f"{type(example).__name__}{tuple(getattr(example, 'shape', ()))}")


def count_params(model: nn.Module) -> int:
    """Number of parameter elements of ``model`` (each shared parameter once; buffers excluded)."""
    _check(model, None, "count_params")
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of Conv and Linear weights for ONE item of ``example`` [N, ...] (see module doc).

    The model runs once on ``example`` in eval mode without gradients; its flags are restored.
    """
    _check(model, example, "count_macs")
    total = 0

    def hook(m, args, out):
        nonlocal total
        handler = user_handler(m)
        if defines(handler, "macs"):
            total += int(handler.macs(m, args, out) or 0)
        elif isinstance(m, _CONVS):
            total += out.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)
        else:
            total += out.numel() * m.in_features

    handles = [m.register_forward_hook(hook) for m in _counted(model)]
    try:
        with eval_mode(model), torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return total // example.shape[0]


def _counted(model: nn.Module) -> list[nn.Module]:
    """The modules whose MACs count: Conv / Linear, and registered types whose handler defines ``macs``
    (their submodules are then not counted again)."""
    out, inside = [], set()
    for name, m in model.named_modules():
        if any(name.startswith(p) for p in inside):
            continue
        if defines(user_handler(m), "macs"):
            out.append(m)
            inside.add(f"{name}." if name else "")
        elif isinstance(m, _CONVS + (nn.Linear,)):
            out.append(m)
    return out


def latency(model: nn.Module, example: torch.Tensor, *, repeats: int = 20, warmup: int = 3) -> float:
    """Median seconds per forward of ``example`` over ``repeats`` timed runs after ``warmup`` untimed ones.

    Runs in eval mode under ``torch.no_grad()`` (training flags restored afterwards); on CUDA each run
    is synchronized so the time is the device's, not the launch's.
    """
    _check(model, example, "latency")
    for name, v, low in (("repeats", repeats, 1), ("warmup", warmup, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"latency: {name} must be an int >= {low}, got {v!r}")
    cuda = example.is_cuda
    times = []
    with eval_mode(model), torch.no_grad():
        for i in range(warmup + repeats):
            if cuda:
                torch.cuda.synchronize(example.device)
            start = time.perf_counter()
            model(example)
            if cuda:
                torch.cuda.synchronize(example.device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


@dataclass(frozen=True)
class ModelStats:
    """Size of a network: ``params`` parameter elements, ``macs`` multiply-accumulates per input item,
    and optionally ``latency_s``, median seconds per forward of the example used."""
    params: int
    macs: int
    latency_s: float | None = None

    @classmethod
    def of(cls, model: nn.Module, example: torch.Tensor, *, timed: bool = False, repeats: int = 20) -> "ModelStats":
        """Measure ``model`` on ``example``; ``timed=True`` also measures latency (``repeats`` runs)."""
        return cls(count_params(model), count_macs(model, example),
                   latency(model, example, repeats=repeats) if timed else None)

    def ratio_to(self, base: "ModelStats") -> dict:
        """This network's params and MACs as fractions of ``base``'s (e.g. a pruned network vs the original)."""
        return {"params": self.params / base.params if base.params else float("nan"),
                "macs": self.macs / base.macs if base.macs else float("nan")}

    def to_dict(self) -> dict:
        return asdict(self)
