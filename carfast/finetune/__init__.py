"""Fine-tuning after pruning (the CAR paper retrains the pruned network).

``finetune(model, data, config)`` trains a copy of ``model`` with SGD (Nesterov momentum, weight decay,
cosine or constant learning rate, random-crop + flip augmentation done in torch on each batch) and
returns the trained copy in eval mode; the model passed in is never changed. Options live in
``FinetuneConfig`` (or a dict of the same keys). ``teacher=`` with ``distill`` > 0 distils from another
network (the unpruned one), ``calibrate=`` re-estimates the BatchNorm statistics on images of the test
distribution afterwards (``recalibrate_bn``), ``checkpoint=`` saves the state as it goes and resumes an
interrupted run. Top-1 accuracy: ``carfast.evaluate``.

Modules: ``config`` (the options), ``loop`` (the training), ``augment``, ``batchnorm``, ``state`` (the
checkpoint).
"""
from carfast.finetune.augment import black_fill, random_crop_flip
from carfast.finetune.batchnorm import recalibrate_bn
from carfast.finetune.config import FinetuneConfig
from carfast.finetune.loop import finetune

__all__ = ["FinetuneConfig", "finetune", "random_crop_flip", "black_fill", "recalibrate_bn"]
