"""``carfast.criteria``: the public face of ``carfast.pruning.criteria``."""
from carfast.pruning.criteria import (
           CRITERIA,
           apoz,
           draws_fixed_order,
           get_criterion,
           l1_norm,
           mean_activation,
           random_scores,
           taylor,
)

__all__ = ["random_scores", "l1_norm", "mean_activation", "apoz", "taylor", "CRITERIA", "get_criterion",
           "draws_fixed_order"]
