"""The bundled images: a class-balanced 2,000-image slice of the CIFAR-10 test set (``carfast/assets``),
or a full copy given by path; ``load_npz`` reads images and labels from any ``.npz`` (x, y, classes);
``cifar10_train`` / ``decode_jpegs`` (``train.py``) read the JPEG training set for fine-tuning."""
from carfast.data.arrays import load_npz
from carfast.data.cifar10 import cifar10_classes, cifar10_test, normalize_images
from carfast.data.train import cifar10_train, decode_jpegs

__all__ = ["cifar10_test", "cifar10_classes", "normalize_images", "load_npz", "cifar10_train", "decode_jpegs"]
