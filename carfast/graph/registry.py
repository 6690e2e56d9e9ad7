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

A layer of the user's own that makes new channels (a fused conv-BatchNorm-activation) returns
``Rule("mix", weight=module)`` and defines ``filters``, ``slice`` and, as needed, ``masks``, ``sizes`` and
``macs`` (``ModuleHandler``); docs/usage.md has the example.
"""
from __future__ import annotations

from torch import nn

__all__ = ["ModuleHandler", "HANDLERS", "register_module", "unregister_module", "handler_for", "is_registered",
           "user_handler", "defines", "layer_filters"]


class ModuleHandler:
    """Everything carfast needs to know about one module type (module docstring). Subclass it and define
    ``rule``; the other methods are needed only for what the type does:

    - ``filters``: the type makes new channels that carfast may score and remove (a conv-like layer);
    - ``slice``: surgery must resize it (it reads or makes channels that a removal deletes);
    - ``masks``: ``carfast.integrations.masks.to_masks`` must express a removal on it;
    - ``sizes``: it keeps size attributes that ``slice`` changes (saved and restored by ``save_pruned``);
    - ``macs``: ``carfast.surgery.measure.count_macs`` should count its multiply-accumulates.
    """

    def rule(self, module: nn.Module, op, rank: int):
        """The ``graph.rule.Rule`` of one call of ``module`` (``op``, an ``ir.Op``; ``rank``: input dims).
        A layer that mixes input channels into new ones returns ``Rule("mix", weight=module)``."""
        raise NotImplementedError(f"{type(self).__name__}.rule: a ModuleHandler must say what the module does to "
                                  "channels (return a carfast.graph.rule.Rule)")

    def filters(self, module: nn.Module) -> int | None:
        """The number of output channels (filters) when ``module`` is a layer carfast scores, else None."""
        return None

    def slice(self, module: nn.Module, ins: list[int], outs: list[int], params: dict) -> None:
        """Delete, in place, input channels ``ins`` and output channels ``outs`` (sorted indices) of
        ``module``, and cut each tensor ``params`` names ({attribute: (dim, indices)}, from the rule's
        ``params``). ``carfast.surgery.cut_tensor`` cuts one tensor. Not defined: carfast cuts ``params``
        and refuses a removal that reaches the module's channels."""
        raise NotImplementedError

    def masks(self, module: nn.Module, ins: list[int], outs: list[int]) -> dict | None:
        """{attribute: 0/1 tensor of its shape} masking what ``slice(module, ins, outs, {})`` would delete,
        for ``torch.nn.utils.prune``; None when weight masks cannot express it."""
        return None

    def sizes(self, module: nn.Module) -> dict:
        """{attribute: int or tuple of ints}: size attributes ``slice`` keeps up to date, which
        ``save_pruned`` records and ``load_pruned_model`` sets again."""
        return {}

    def macs(self, module: nn.Module, inputs: tuple, output) -> int | None:
        """Multiply-accumulates of one call (``inputs`` and ``output`` as a forward hook sees them, for
        the whole batch); None: not counted (its submodules' own counts stand)."""
        return None


def defines(handler: ModuleHandler | None, method: str) -> bool:
    """True when ``handler`` overrides ``ModuleHandler.<method>``."""
    return handler is not None and getattr(type(handler), method) is not getattr(ModuleHandler, method)


def user_handler(module: nn.Module) -> ModuleHandler | None:
    """The handler ``register_module`` gave ``module``'s type (or a class it derives from), or None."""
    return next((HANDLERS[t] for t in type(module).__mro__ if t in _USER), None)


def layer_filters(module: nn.Module) -> int | None:
    """The number of filters of a layer carfast scores: a Conv2d's output channels, a Linear's output
    features, a registered type's ``filters``; None for any other module."""
    handler = user_handler(module)
    if handler is not None:
        return handler.filters(module)
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    if isinstance(module, nn.Linear):
        return module.out_features
    return None


#: module type -> its handler: carfast's own (torch.nn, ``module_rules.py``) and the users'
HANDLERS: dict[type, ModuleHandler] = {}
_USER: set[type] = set()


def handler_for(module: nn.Module) -> ModuleHandler | None:
    """The handler of the most derived class of ``module`` that has one, or None."""
    return next((HANDLERS[t] for t in type(module).__mro__ if t in HANDLERS), None)


def is_registered(module: nn.Module) -> bool:
    """True when ``module``'s type, or a class it derives from, was registered by ``register_module``."""
    return user_handler(module) is not None


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
