"""The bundled images: a class-balanced 2,000-image slice of the CIFAR-10 test set (``carfast/assets``),
or a full copy given by path; ``load_npz`` reads images and labels from any ``.npz`` (x, y, classes);
``carfast.data.train`` reads the JPEG training set for fine-tuning."""
from carfast.data.arrays import load_npz
from carfast.data.cifar10 import cifar10_classes, cifar10_test, normalize_images

__all__ = ["cifar10_test", "cifar10_classes", "normalize_images", "load_npz"]
