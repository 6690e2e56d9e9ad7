"""Deprecated: ``carfast.train_data`` is ``carfast.data`` (``cifar10_train``, ``decode_jpegs``); importing it
warns."""
import warnings

from carfast.data import cifar10_train, decode_jpegs

__all__ = ["cifar10_train", "decode_jpegs"]

warnings.warn("carfast.train_data is deprecated and will be removed: use carfast.data.cifar10_train and "
              "carfast.data.decode_jpegs", DeprecationWarning, stacklevel=2)
