"""Module types: one handler per type, in one registry that users extend.

A ``ModuleHandler`` says what a module type does to channels: ``rule(module, op, rank) -> Rule``
(``graph.rule.Rule``; ``op`` the call, ``rank`` the number of dims of its data input). carfast's own
handlers cover ``torch.nn`` (``module_rules.py``); ``register_module(MyLayer, handler)`` adds a type of
the user's own. A registered type is analysed as one call, by its handler, instead of by following its
``forward`` call by call: the way to use carfast with a layer whose forward it cannot follow (an op it
does not know, a custom kernel). The handler is found along the class's MRO, so subclasses inherit it.

Example: a gate that mixes positions along the width only, through ``cumsum``, an op carfast does not
know, so its channels stay separate::

    from carfast.graph.rule import Rule

    class WidthGate(nn.Module):
        def forward(self, x):                       # [N, C, H, W] -> [N, C, H, W]
            return x * torch.sigmoid(x.cumsum(-1))

    class WidthGateHandler(carfast.ModuleHandler):
        def rule(self, module, op, rank):
            return Rule("reduce", axes=(rank - 1,))  # positions along the last axis meet; channels do not

    carfast.register_module(WidthGate, WidthGateHandler())
"""
from __future__ import annotations

from torch import nn

__all__ = ["ModuleHandler", "HANDLERS", "register_module", "unregister_module", "handler_for", "is_registered"]


class ModuleHandler:
    """How channels pass through one module type (module docstring). Subclass it and define ``rule``."""

    def rule(self, module: nn.Module, op, rank: int):
        """The ``graph.rule.Rule`` of one call of ``module`` (``op``, an ``ir.Op``; ``rank``: input dims)."""
        raise NotImplementedError(f"{type(self).__name__}.rule: a ModuleHandler must say what the module does to "
                                  "channels (return a carfast.graph.rule.Rule)")


#: module type -> its handler: carfast's own (torch.nn, ``module_rules.py``) and the users'
HANDLERS: dict[type, ModuleHandler] = {}
_USER: set[type] = set()


def handler_for(module: nn.Module) -> ModuleHandler | None:
    """The handler of the most derived class of ``module`` that has one, or None."""
    return next((HANDLERS[t] for t in type(module).__mro__ if t in HANDLERS), None)


def is_registered(module: nn.Module) -> bool:
    """True when ``module``'s type, or a class it derives from, was registered by ``register_module``."""
    return any(t in _USER for t in type(module).__mro__)


def register_module(module_type: type, handler: ModuleHandler) -> None:
    """Analyse every module of ``module_type`` (and its subclasses) as one call, by ``handler``.

    Raises TypeError for a type that is not an ``nn.Module`` subclass or a handler that is not a
    ``ModuleHandler``; ValueError for a ``torch.nn`` type carfast already handles.
    """
    if not isinstance(module_type, type) or not issubclass(module_type, nn.Module):
        raise TypeError(f"register_module: module_type must be an nn.Module subclass, got {module_type!r}")
    if not isinstance(handler, ModuleHandler):
        raise TypeError(f"register_module: handler must be a carfast.ModuleHandler (with a rule method), got "
                        f"{type(handler).__name__}")
    if module_type in HANDLERS and module_type not in _USER:
        raise ValueError(f"register_module: carfast already handles {module_type.__name__}; register a subclass of "
                         "your own instead")
    HANDLERS[module_type] = handler
    _USER.add(module_type)


def unregister_module(module_type: type) -> None:
    """Forget a type ``register_module`` registered (its modules are followed call by call again)."""
    if module_type not in _USER:
        raise ValueError(f"unregister_module: {getattr(module_type, '__name__', module_type)!r} was not registered "
                         "by register_module")
    _USER.discard(module_type)
    del HANDLERS[module_type]
