"""The bundled networks: the CIFAR ResNets (pretrained weights in ``carfast/assets``) and the
AlexNet-style CIFAR network, the option-A shortcut the ResNets use, and the general parameter-free
channel map (``channel_map.ChannelMap``)."""
from carfast.models.cifar import (
                                  ALEXNET_CIFAR_NORMALIZATION,
                                  CIFAR_RESNET_NORMALIZATION,
                                  AlexNetCifar,
                                  BasicBlock,
                                  CifarResNet,
                                  OptionAShortcut,
                                  alexnet_cifar,
                                  bundled_resnet_depths,
                                  cifar_resnet,
)

__all__ = ["CifarResNet", "BasicBlock", "OptionAShortcut", "cifar_resnet", "AlexNetCifar", "alexnet_cifar",
           "CIFAR_RESNET_NORMALIZATION", "ALEXNET_CIFAR_NORMALIZATION", "bundled_resnet_depths"]
