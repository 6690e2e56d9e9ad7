"""carfast: exact, fast CAR (Classification Accuracy Reduction) filter scoring and pruning for CNNs.

``score_layer(model, layer, data)`` scores every filter of a Conv2d or Linear by the accuracy the
network loses when that filter is removed, equal to re-running the network once per filter;
``prune(model, layers, data, keep=...)`` removes filters greedily by CAR (or a baseline criterion of
``carfast.criteria``) and returns a physically smaller model; ``remove_filters`` is the surgery;
``ClassImportance`` interprets the class-wise CAR of each filter. ``score_group`` and
``remove_groups`` do the same for the coupled channels of a residual stream (``carfast.groups``).
"""
from . import criteria, data, finetune, integrations, models, train_data
from ._ext import backends
from .classwise import ClassImportance
from .engine import LayerScorer, ScoreOptions, score_layer
from .evaluate import evaluate
from .group_scorer import GroupScorer, score_group
from .layers import LayerInfo, layers
from .prune import prune
from .prune_result import PruneResult, load_pruned
from .report import write_report
from .scores import LayerScores
from .surgery import remove_filters, remove_groups

__version__ = "0.2.0"
__all__ = ["score_layer", "LayerScorer", "score_group", "GroupScorer", "remove_groups", "layers", "LayerInfo", "LayerScores", "ScoreOptions",
           "prune", "PruneResult", "load_pruned", "remove_filters", "write_report", "evaluate", "ClassImportance",
           "criteria", "finetune", "train_data", "integrations", "backends", "models", "data", "__version__"]
