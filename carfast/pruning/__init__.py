"""Greedy CAR pruning: ``prune`` (``prune``), its result (``result.PruneResult``) and accuracy on data
(``evaluate``); the baseline criteria and fine-tuning are ``carfast.criteria`` and ``carfast.finetune``."""
from carfast.pruning.evaluate import Evaluation, evaluate
from carfast.pruning.prune import prune
from carfast.pruning.result import PruneResult, PruneSummary, load_pruned

__all__ = ["prune", "PruneResult", "PruneSummary", "load_pruned", "evaluate", "Evaluation"]
