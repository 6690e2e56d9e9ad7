"""carfast: exact, fast CAR (Classification Accuracy Reduction) filter scoring for CNNs.

``score_layer(model, layer, data)`` scores every filter of a Conv2d or Linear by the accuracy the
network loses when that filter is removed, equal to re-running the network once per filter.
"""
from . import data, models
from ._ext import backends
from .engine import LayerScorer, ScoreOptions, score_layer
from .scores import LayerScores

__version__ = "0.1.0"
__all__ = ["score_layer", "LayerScorer", "LayerScores", "ScoreOptions", "backends", "models", "data", "__version__"]
