"""Error helpers: messages that name the problem, what came, and the fix."""
from __future__ import annotations

import difflib

from torch import nn

__all__ = ["resolve_layer"]


def resolve_layer(model: nn.Module, layer, fn: str = "score_layer") -> tuple[str, nn.Module]:
    """``(name, module)`` for ``layer`` given as a name in ``model.named_modules()`` or a module."""
    names = dict(model.named_modules())
    if isinstance(layer, nn.Module):
        for name, mod in names.items():  # noqa: B007 - name is used after the loop breaks
            if mod is layer:
                break
        else:
            raise ValueError(f"{fn}: the module passed as layer ({type(layer).__name__}) is not part of the "
                             "model; pass a module from model.named_modules() or its name")
    elif isinstance(layer, str):
        if layer not in names or layer == "":
            near = difflib.get_close_matches(layer, [n for n in names if n], n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(repr(n) for n in near)}?" if near else \
                "; see [n for n, _ in model.named_modules()]"
            raise ValueError(f"{fn}: layer {layer!r} not found in the model{hint}")
        name, mod = layer, names[layer]
    else:
        raise TypeError(f"{fn}: layer must be a module name (str) or an nn.Module, got {type(layer).__name__}")
    if not isinstance(mod, (nn.Conv2d, nn.Linear)):
        raise TypeError(f"{fn}: layer {name!r} is a {type(mod).__name__}; CAR scores the filters of a Conv2d "
                        "or the features of a Linear: pass one of those")
    return name, mod
