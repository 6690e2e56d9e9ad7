"""Models whose forward does not take one tensor and return logits: ``adapt(model, forward)``.

carfast feeds a model one input tensor per batch ([N, ...], the first element of each data batch) and
reads logits [N, classes] back. A model that takes a dict, keyword arguments or several tensors, or that
returns a dict, a tuple or an output object, is scored through an adapted copy:

    net = carfast.adapt(model, lambda m, x: m(pixel_values=x).logits)
    carfast.score_layer(net, "encoder.conv1", (x, y))

``forward(m, x)`` maps the batch tensor ``x`` [N, ...] to logits [N, classes]; calling ``m`` runs the
model's own forward. Several inputs per image travel packed in one tensor and are split inside
``forward`` (e.g. ``lambda m, x: m(x[:, :3], x[:, 3:])``); a constant extra input (a prompt, a mask shared
by every image) is captured by the function.

The adapted model is a shallow copy of ``model`` whose class is a subclass of the model's class with
``forward`` replaced: the same submodules under the same names (layer names stay the user's), the same
parameters, and the model's own forward code, so torch.fx traces through it and carfast's fast methods
apply. The model passed in is not changed. ``PruneResult.model`` of an adapted model is adapted too;
``unadapt`` gives it back with the model's own class (its own forward).
"""
from __future__ import annotations

import copy

from torch import nn

__all__ = ["adapt", "unadapt", "is_adapted"]

_FN = "adapt"


class _OwnForward:
    """What ``forward(m, x)`` receives as ``m``: calling it runs the model's own forward on the adapted
    instance (so the submodules it calls are the adapted model's; hooks on the adapted model itself run
    around the adapted forward, not again here); attributes read through to it."""

    def __init__(self, module: nn.Module, base: type):
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_base", base)

    def __call__(self, *args, **kwargs):
        return self._base.forward(self._module, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._module, name)


def _adapted_class(base: type) -> type:
    def forward(self, x):
        return self._carfast_forward(_OwnForward(self, base), x)
    return type(f"{base.__name__}WithForward", (base,), {
        "forward": forward, "_carfast_base": base, "__module__": base.__module__,
        "__doc__": f"{base.__name__} with its forward adapted by carfast.adapt (unadapt gives it back)."})


def _shallow(model: nn.Module) -> nn.Module:
    """A new module object with the same submodules, parameters, buffers and hooks, in containers of its
    own (so that setting an attribute or registering a hook on it does not do so on ``model``)."""
    out = copy.copy(model)
    for key, value in list(vars(out).items()):
        if isinstance(value, (dict, set)):
            vars(out)[key] = type(value)(value)
    return out


def is_adapted(model) -> bool:
    """Whether ``model`` came from ``adapt`` (or is a copy of such a model, e.g. a pruned one)."""
    return isinstance(model, nn.Module) and "_carfast_base" in type(model).__dict__


def adapt(model: nn.Module, forward) -> nn.Module:
    """A copy of ``model`` whose forward is ``forward(m, x) -> logits [N, classes]`` (see the module doc).

    Args:
        model: the ``nn.Module`` (not changed; its submodules are shared by the copy, not duplicated).
        forward: a callable ``(m, x)``: ``x`` the batch tensor [N, ...], ``m`` runs the model's own forward.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{_FN}: model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(forward):
        raise TypeError(f"{_FN}: forward must be a callable (m, x) -> logits, e.g. lambda m, x: m(pixel_values=x)"
                        f".logits; got {type(forward).__name__}")
    base = type(model)._carfast_base if is_adapted(model) else type(model)
    out = _shallow(model)
    out.__class__ = _adapted_class(base)
    object.__setattr__(out, "_carfast_forward", forward)
    return out


def unadapt(model: nn.Module) -> nn.Module:
    """``model`` (from ``adapt``, or a pruned copy of one) with its own class and forward again; a model
    that is not adapted is returned as it is."""
    if not is_adapted(model):
        return model
    out = _shallow(model)
    out.__class__ = type(model)._carfast_base
    out.__dict__.pop("_carfast_forward", None)
    return out
