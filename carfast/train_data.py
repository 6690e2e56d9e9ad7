"""``carfast.train_data``: the public face of ``carfast.data.train``."""
from carfast.data.train import cifar10_train, decode_jpegs

__all__ = ["cifar10_train", "decode_jpegs"]
