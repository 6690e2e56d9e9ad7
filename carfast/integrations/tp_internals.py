"""Torch-Pruning's private attributes that carfast reads, behind this one module (Torch-Pruning 1.6).

``CARImportance`` (``torch_pruning.py``) is called by Torch-Pruning with a group and needs three things
Torch-Pruning keeps private:

- ``graph_of(group)``: the ``DependencyGraph`` a group belongs to (``group._DG``);
- ``layer_name(graph, module)``: a module's name in the model (``graph._module2name``), None for a module
  the graph does not hold;
- ``asked(pruner, group)``: whether the pruner's step will ask about ``group``, i.e. it is not pruned to
  its limit yet (``pruner._check_pruning_ratio``).

Nothing else in carfast names them; ``tests/test_third_party.py`` checks each on the installed
Torch-Pruning, so a release that renames one fails there, by name.
"""
from __future__ import annotations

__all__ = ["graph_of", "layer_name", "asked"]


def graph_of(group):
    """The ``DependencyGraph`` that made ``group``."""
    return group._DG


def layer_name(graph, module) -> str | None:
    """``module``'s name in ``graph.model`` (as ``named_modules`` gives it), None if the graph does not hold it."""
    return graph._module2name.get(module)


def asked(pruner, group) -> bool:
    """Whether ``pruner``'s step will ask about ``group`` (not yet pruned to its ratio); True for every group
    with a release that has no such check (only the progress bar's total depends on it)."""
    check = getattr(pruner, "_check_pruning_ratio", None)
    return True if check is None else bool(check(group))
