"""``carfast.finetune``: the public face of ``carfast.pruning.finetune``."""
from carfast.pruning.finetune import FinetuneConfig, finetune, random_crop_flip

__all__ = ["FinetuneConfig", "finetune", "random_crop_flip"]
