"""``carfast.criteria``: the public face of ``carfast.pruning.criteria``."""
from carfast.pruning.criteria import random_scores, l1_norm, mean_activation, apoz, taylor, CRITERIA, get_criterion

__all__ = ["random_scores", "l1_norm", "mean_activation", "apoz", "taylor", "CRITERIA", "get_criterion"]
