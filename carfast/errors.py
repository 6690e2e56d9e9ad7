"""carfast's error and warning classes, and helpers for messages that name the problem, what came, and
the fix. The classes are re-exported where they are raised (``carfast.graph.FlowError``...)."""
from __future__ import annotations

import difflib

import torch
from torch import nn

__all__ = ["resolve_layer", "scorable_near", "state_dict_mismatch", "input_mismatch", "run_failure",
           "CarfastWarning", "NearChanceWarning", "FlowError", "TraceError", "UnitMerge", "CliError"]


class FlowError(ValueError):
    """A removal carfast refuses, with the message saying why and what to do. ``reason`` tags it:
    "coupled" / "merge" (other channels go with it: ``score_group``), "unsupported" (an op carfast cannot
    follow), "output" (the layer makes the outputs), "shared" (a module called more than once),
    "spread" (channels spread over positions or axes, as in a channel shuffle), "sizes" (a size written
    into forward), "constant", "weight" (a functional layer's weight computed in forward)."""

    def __init__(self, message: str, reason: str = "unsupported"):
        super().__init__(message)
        self.reason = reason


class TraceError(RuntimeError):
    """torch.fx could not trace or run the model symbolically (the recorded pass applies instead)."""


class UnitMerge(Exception):
    """Two channels of the target meet at one position (``op``, a ``graph.ir.Op``): they can only be
    removed together (the walker raises it; ``graph.flow`` turns it into a ``FlowError``)."""

    def __init__(self, op, a: int, b: int):
        super().__init__(f"filters {a - 1} and {b - 1} meet at {op.label}")
        self.op, self.a, self.b = op, a - 1, b - 1


class CliError(ValueError):
    """A bad argument found by the command itself (printed as one line, exit status 2)."""


class CarfastWarning(UserWarning):
    """A warning carfast gives about the user's input or a result (the command line prints it as one line)."""


class NearChanceWarning(CarfastWarning):
    """The intact model's accuracy on the scoring data is near chance (``scoring.checks.warn_near_chance``)."""


def scorable_near(model: nn.Module, name: str, n: int = 3) -> list[str]:
    """Up to ``n`` names of Conv2d / Linear layers of ``model`` close to ``name`` (the layers a
    "did you mean" may suggest: only those carfast can score)."""
    from carfast.graph.registry import layer_filters
    names = [k for k, m in model.named_modules() if k and layer_filters(m) is not None]
    return difflib.get_close_matches(name, names, n=n, cutoff=0.5)


def state_dict_mismatch(model: nn.Module, state, limit: int = 3) -> str:
    """What keeps ``state`` from loading into ``model`` strictly, in one line: the missing and unexpected
    keys and the shapes that differ (the first ``limit`` of each, with a count of the rest)."""
    if not isinstance(state, dict):
        return f"it holds a {type(state).__name__}, not a state dict"
    own = model.state_dict()

    def some(items):
        items = list(items)
        more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
        return ", ".join(items[:limit]) + more

    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    sizes = [f"{k} {list(state[k].shape)} vs the model's {list(own[k].shape)}" for k in own
             if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != own[k].shape]
    parts = ([f"missing {len(missing)} key(s): {some(missing)}"] if missing else []) + \
            ([f"{len(unexpected)} unexpected key(s): {some(unexpected)}"] if unexpected else []) + \
            ([f"{len(sizes)} shape(s) differ: {some(sizes)}"] if sizes else [])
    return "; ".join(parts) or "the keys and shapes match"


def input_mismatch(model: nn.Module, example: torch.Tensor) -> str | None:
    """The first Conv / Linear of ``model`` whose input does not fit it when ``model`` runs on ``example``,
    as a phrase ("layer 'stem' (Conv2d) takes 3 input channels but gets 1"), or None. Runs the model once
    (eval mode, no gradients, flags restored) with forward pre-hooks, stopping at the mismatch."""
    from carfast.batching import eval_mode

    class _Found(Exception):
        pass

    names = {id(m): k for k, m in model.named_modules()}
    found = []

    def pre(m, args):
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if x is None or x.dim() == 0 or isinstance(m, nn.modules.lazy.LazyModuleMixin):   # lazy: sizes not yet known
            return
        if isinstance(m, nn.modules.conv._ConvNd) and not m.transposed:
            axis = -(len(m.kernel_size) + 1)
            if x.dim() >= -axis and x.shape[axis] != m.in_channels:
                found.append(f"layer {names.get(id(m), '?')!r} ({type(m).__name__}) takes {m.in_channels} input "
                             f"channels but gets {x.shape[axis]}")
                raise _Found
        elif isinstance(m, nn.Linear) and x.shape[-1] != m.in_features:
            found.append(f"layer {names.get(id(m), '?')!r} (Linear) takes {m.in_features} input features but gets "
                         f"{x.shape[-1]}")
            raise _Found

    handles = [m.register_forward_pre_hook(pre) for m in model.modules()
               if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    try:
        with eval_mode(model), torch.no_grad():
            model(example)
    except Exception:  # noqa: BLE001 - _Found, or the failure being explained: only ``found`` matters
        pass
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


def run_failure(model: nn.Module, example: torch.Tensor, err: BaseException) -> str:
    """One line saying why ``model`` does not run on ``example`` [1, ...] and what to do."""
    shape = list(example.shape)
    mismatch = input_mismatch(model, example)
    if mismatch is not None:
        return (f"the model does not take inputs of shape {shape}: {mismatch}; pass inputs of the shape and "
                "size it was built for (the data's channels, height and width), e.g. those it was trained on")
    first = (str(err).strip().splitlines() or [""])[0]
    return (f"the model does not run on one input tensor of shape {shape} ({type(err).__name__}: {first}); pass "
            "inputs it takes, or, if its forward takes something else (a dict, keyword arguments, several "
            "tensors) or returns something else than logits, adapt it: carfast.adapt(model, lambda m, x: m(...))")


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
            near = scorable_near(model, layer)
            hint = f"did you mean {', '.join(repr(n) for n in near)}? " if near else ""
            raise ValueError(f"{fn}: layer {layer!r} not found in the model; {hint}carfast.layers(model) lists the "
                             "layers carfast can score")
        name, mod = layer, names[layer]
    else:
        raise TypeError(f"{fn}: layer must be a module name (str) or an nn.Module, got {type(layer).__name__}")
    from carfast.graph.registry import layer_filters
    if layer_filters(mod) is None:
        raise TypeError(f"{fn}: layer {name!r} is a {type(mod).__name__}; CAR scores the filters of a Conv2d "
                        "or the features of a Linear (or of a type registered with a handler that defines "
                        "filters): pass one of those")
    return name, mod
