"""carfast inside other pruning tools.

* ``masks``: ``torch.nn.utils.prune`` masks for carfast's removals (``to_masks``) and back
  (``from_masks``).
"""
from carfast.integrations import masks  # noqa: F401
