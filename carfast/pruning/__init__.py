"""Greedy CAR pruning: ``prune`` (``prune``), its result (``result.PruneResult``), the baseline criteria
(``criteria``), fine-tuning (``finetune``) and accuracy on data (``evaluate``)."""
from carfast.pruning.evaluate import Evaluation, evaluate
from carfast.pruning.prune import prune
from carfast.pruning.result import PruneResult, PruneSummary, load_pruned

__all__ = ["prune", "PruneResult", "PruneSummary", "load_pruned", "evaluate", "Evaluation"]
