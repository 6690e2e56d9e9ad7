"""``FinetuneConfig``: the options of ``finetune``, checked on construction."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

__all__ = ["FinetuneConfig"]

_SCHEDULES = ("cosine", "constant")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class FinetuneConfig:
    """Options of ``finetune``; every value is checked on construction (ValueError / TypeError).

    ``schedule``: "cosine" anneals the learning rate per step from ``lr`` to 0 over all epochs,
    "constant" keeps ``lr``. ``augment``: random crop of the image padded by 4 pixels and a random
    horizontal flip, per image (``random_crop_flip``); ``pad_fill`` None pads by reflection, a number or
    one per channel pads with that constant (in the data's units; black is ``-mean / std`` per channel
    for normalised images). Use the padding the network was trained with: the bundled CIFAR ResNets'
    BatchNorm statistics are those of black-padded crops (experiments/RESULTS.md).
    ``max_images``: at most this many images per epoch.
    ``seed`` fixes the shuffle, the augmentation and dropout, so runs repeat bit for bit.
    ``bn_stats``: "freeze" (default) keeps every BatchNorm's running mean and variance as they are (the
    BN layers run in eval mode; their affine weights still train), "update" re-estimates them from the
    training batches. Freezing is the default because a short fine-tune on data that differs from the
    test distribution (the JPEG copies of CIFAR-10) otherwise moves the statistics away from it: measured
    on ResNet-20, 1 epoch on 5,000 JPEG images cost 3.9 points of test accuracy with "update" even at a
    tiny learning rate, and none with the statistics kept (91.80 % -> 91.90 %). ``finetune(calibrate=)``
    re-estimates them after training on images of the test distribution instead, augmented as the training
    batches are (when ``augment``) over ``calibrate_passes`` passes: the weights were trained under the
    statistics of augmented batches, and statistics of plain images cost the pretrained ResNet-56 1.8
    points of test accuracy (experiments/RESULTS.md).
    ``distill``: the weight (in [0, 1]) of distillation from ``finetune(teacher=)``: the loss is
    ``(1 - distill) * cross_entropy(labels) + distill * T**2 * KL(teacher || student)`` at temperature
    ``temperature`` T (Hinton et al. 2015). With a teacher trained on clean images it also keeps the
    student from fitting what the JPEG copies changed. ``checkpoint_images``: with ``finetune(checkpoint=)``,
    save the state after about this many images (and at the end of every epoch). ``channels_last``:
    train in the channels-last memory format (faster convolutions on CPUs and GPUs; the same arithmetic up
    to rounding); the returned model is in the usual format either way.
    """
    epochs: int = 1
    lr: float = 0.01
    batch_size: int = 128
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    augment: bool = True
    label_smoothing: float = 0.0
    schedule: str = "cosine"
    seed: int = 0
    max_images: int | None = None
    bn_stats: str = "freeze"
    distill: float = 0.0
    temperature: float = 4.0
    checkpoint_images: int = 10000
    channels_last: bool = False
    pad_fill: float | tuple | None = None
    calibrate_passes: int = 4

    def __post_init__(self):
        def bad(key, want):
            return ValueError(f"FinetuneConfig: {key} must be {want}, got {getattr(self, key)!r}")
        for key in ("epochs", "batch_size", "checkpoint_images", "calibrate_passes"):
            if not _is_int(getattr(self, key)) or getattr(self, key) < 1:
                raise bad(key, "a positive int")
        if self.max_images is not None and (not _is_int(self.max_images) or self.max_images < 1):
            raise bad("max_images", "a positive int or None")
        if not _is_int(self.seed):
            raise bad("seed", "an int")
        for key, lo, hi, want in (("lr", 0, math.inf, "a positive finite number"),
                                  ("momentum", 0, 1, "a number in [0, 1)"),
                                  ("weight_decay", 0, math.inf, "a number >= 0"),
                                  ("label_smoothing", 0, 1, "a number in [0, 1)"),
                                  ("distill", 0, math.nextafter(1.0, 2.0), "a number in [0, 1]"),
                                  ("temperature", 0, math.inf, "a positive finite number")):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (lo <= v < hi) or \
                    (key in ("lr", "temperature") and v == 0):
                raise bad(key, want)
        for key in ("nesterov", "augment", "channels_last"):
            if not isinstance(getattr(self, key), bool):
                raise bad(key, "True or False")
        if self.bn_stats not in ("freeze", "update"):
            raise bad("bn_stats", "'freeze' or 'update'")
        if self.schedule not in _SCHEDULES:
            raise bad("schedule", f"one of {_SCHEDULES}")
        self._check_pad_fill()
        if self.nesterov and self.momentum == 0:
            raise ValueError("FinetuneConfig: nesterov=True needs momentum > 0; set momentum (e.g. 0.9) "
                             "or nesterov=False")

    def _check_pad_fill(self) -> None:
        if self.pad_fill is None:
            return
        values = self.pad_fill if isinstance(self.pad_fill, (tuple, list)) else (self.pad_fill,)
        if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                             for v in values):
            raise ValueError("FinetuneConfig: pad_fill must be None (reflect padding), a finite number or a tuple of "
                             f"them (one per channel), got {self.pad_fill!r}")
        if isinstance(self.pad_fill, list):
            self.pad_fill = tuple(self.pad_fill)

    @classmethod
    def from_any(cls, config) -> FinetuneConfig:
        """``None`` (defaults), a ``FinetuneConfig``, or a dict of its fields."""
        if config is None:
            return cls()
        if isinstance(config, cls):
            return config
        if isinstance(config, dict):
            valid = [f.name for f in dataclasses.fields(cls)]
            unknown = sorted(str(k) for k in config if k not in valid)
            if unknown:
                raise ValueError(f"finetune: unknown config key(s) {unknown}; valid keys: {valid}")
            return cls(**config)
        raise TypeError(f"finetune: config must be a FinetuneConfig, a dict or None, got {type(config).__name__}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
