"""carfast: exact, fast CAR (Classification Accuracy Reduction) filter scoring and pruning for CNNs.

``score_layer(model, layer, data)`` scores every filter of a Conv2d or Linear by the accuracy the
network loses when that filter is removed, equal to re-running the network once per filter;
``prune(model, layers, data, keep=...)`` removes filters greedily by CAR (or a baseline criterion of
``carfast.criteria``) and returns a physically smaller model; ``remove_filters`` is the surgery;
``ClassImportance`` interprets the class-wise CAR of each filter. A target given as ``Group(layer)``
is the layer's coupling group: the coupled channels of a residual stream (``carfast.graph.find_group``),
scored and cut by the same functions (``score_group`` and ``remove_groups`` take every target as one);
``layers(model)`` says which layers carfast scores alone, as a group, or not. A model whose forward does
not take one tensor and return logits is scored through ``adapt(model, forward)``.

The package: ``graph`` (the channel-flow analysis), ``scoring``, ``surgery``, ``pruning``, ``report``,
``models`` and ``data`` (bundled), ``ops`` (kernels), ``integrations``, ``cli``; ``docs/design.md``.
"""
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

from carfast import criteria, data, finetune, integrations, models
from carfast.adapter import adapt, unadapt
from carfast.extensions import backends
from carfast.graph import LayerInfo, layers
from carfast.graph.registry import ModuleHandler, register_module, unregister_module
from carfast.graph.target import Group
from carfast.pruning import PruneResult, evaluate, load_pruned, prune
from carfast.pruning.compare import CriteriaComparison, compare_criteria
from carfast.report import write_report
from carfast.scoring import (
    ClassImportance,
    GroupScorer,
    LayerScorer,
    LayerScores,
    Race,
    ScoreOptions,
    score_group,
    score_layer,
)
from carfast.surgery import load_pruned_model, remove_filters, remove_groups, save_pruned

_DEPRECATED_MODULES = ("groups", "train_data")     # carfast.graph / carfast.data now; importing them warns


def __getattr__(name):
    """``carfast.groups`` and ``carfast.train_data`` without an import, as before (with their warning)."""
    if name in _DEPRECATED_MODULES:
        import importlib
        return importlib.import_module(f"carfast.{name}")
    raise AttributeError(f"module 'carfast' has no attribute {name!r}")


try:
    __version__ = _version("carfast")
except PackageNotFoundError:      # not installed (a bare checkout on sys.path)
    __version__ = "0+unknown"

__all__ = ["score_layer", "LayerScorer", "Group", "score_group", "GroupScorer", "remove_groups", "layers", "LayerInfo",
           "LayerScores", "ScoreOptions", "Race", "prune", "PruneResult", "load_pruned", "compare_criteria",
           "CriteriaComparison", "remove_filters", "save_pruned", "load_pruned_model", "write_report",
           "evaluate", "ClassImportance", "criteria", "finetune", "integrations", "backends", "models",
           "data", "adapt", "unadapt", "ModuleHandler", "register_module", "unregister_module", "__version__"]
