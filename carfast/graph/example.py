"""One input for analysing a model: the example the caller gives, or one inferred from its first layer."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from carfast.errors import run_failure
from carfast.graph.registry import layer_filters

__all__ = ["infer_example", "signature"]

#: square input sizes tried, in order, when no example is given and the first layer has ``in_channels``
_GUESS_SIZES = (32, 224, 64, 28, 16, 96, 128)


def signature(out) -> list[tuple]:
    """The shapes of the tensors in a model's output (a tensor, tuple, dict...)."""
    return [tuple(t.shape) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


def infer_example(model: nn.Module, example, fn: str) -> tuple[torch.Tensor, list]:
    """(input [1, ...], ``signature`` of the model's output on it): ``example`` or an inferred input."""
    if example is not None:
        if not isinstance(example, torch.Tensor) or example.dim() < 1 or example.shape[0] < 1:
            raise TypeError(f"{fn}: example must be an input tensor [1, ...], got "
                            f"{type(example).__name__}{tuple(getattr(example, 'shape', ()))}")
        try:
            out = model(example[:1])
        except Exception as err:  # noqa: BLE001 - the user's model does not take this input: say why, in one line
            raise ValueError(f"{fn}: {run_failure(model, example[:1], err)}") from None
        return example[:1], signature(out)
    shapes = []
    arch = getattr(model, "carfast_arch", None)
    if isinstance(arch, dict) and arch.get("input_shape"):
        shapes.append(tuple(arch["input_shape"]))
    first = next((m for m in model.modules() if layer_filters(m) is not None), None)
    if isinstance(getattr(first, "in_channels", None), int):     # a Conv2d, or a registered conv-like layer
        shapes += [(first.in_channels, s, s) for s in _GUESS_SIZES]
    elif isinstance(getattr(first, "in_features", None), int):
        shapes.append((first.in_features,))
    p = next(model.parameters(), torch.zeros(()))
    for shape in shapes:
        x = torch.zeros((1, *shape), dtype=p.dtype if p.is_floating_point() else torch.float32, device=p.device)
        try:
            out = model(x)
        except Exception:  # noqa: BLE001 - a guess that does not fit; try the next
            continue
        sig = signature(out)
        if sig and all(len(s) >= 1 and s[0] == 1 for s in sig):   # batch 1 in, batch 1 out: not folded
            return x, sig
    raise ValueError(f"{fn}: cannot infer an input for {type(model).__name__} (tried shapes "
                     f"{[(1, *s) for s in shapes]}); pass example=, one input [1, ...] such as x[:1]")
