"""The networks carfast ships and benchmarks: CIFAR-10 ResNets and an AlexNet-style CIFAR net.

Defined here (no torchvision): ``cifar_resnet(depth, pretrained=True)`` builds the CIFAR ResNet of
He et al. (2016) with the parameter-free "option A" shortcut, and loads the bundled pretrained
weights for depth 20 and 56 (``weights=PATH`` loads any of the original checkpoints, e.g. depth 32
or 44). ``alexnet_cifar(pretrained=True)`` builds the AlexNet-shaped network of the kind the CAR paper
prunes and loads the project's own trained weights, bundled in float16 (``carfast/assets/README.md``:
the same top-1 as the float32 original); ``weights=PATH`` loads a checkpoint instead. Weights are cast
to float32 on loading. All weights load with ``torch.load(..., weights_only=True)``.

Each builder records how to rebuild its network in ``model.carfast_arch`` (plain data: ``{"builder":
"cifar_resnet", "kwargs": {"depth": 56}, "input_shape": [3, 32, 32]}``), which ``pruned_io`` uses to
rebuild a saved pruned model and ``surgery`` to infer an input; it is a plain attribute, so it survives
``copy.deepcopy`` and is not part of the state dict.
"""
from __future__ import annotations

import os
from importlib import resources

import torch
import torch.nn.functional as F
from torch import nn

from carfast.models.channel_map import apply_map, set_map

__all__ = ["CifarResNet", "BasicBlock", "cifar_resnet", "AlexNetCifar", "alexnet_cifar",
           "CIFAR_RESNET_NORMALIZATION", "ALEXNET_CIFAR_NORMALIZATION", "bundled_resnet_depths"]

#: (mean, std) of the RGB input in [0, 1] that the pretrained ResNets expect.
CIFAR_RESNET_NORMALIZATION = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
#: (mean, std) default for the AlexNet-style network (its checkpoint carries its own).
ALEXNET_CIFAR_NORMALIZATION = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))

_BUNDLED = {20: "resnet20_cifar10.pt", 56: "resnet56_cifar10.pt"}
_BUNDLED_ALEXNET = "alexnet_cifar10_fp16.pt"


def bundled_resnet_depths() -> tuple[int, ...]:
    """Depths whose pretrained weights ship inside the package."""
    return tuple(sorted(_BUNDLED))


class OptionAShortcut(nn.Module):
    """Parameter-free shortcut: every second pixel, channels zero-padded by ``pad`` on each side.

    Input channel c lands at output channel c + pad. After surgery (``carfast.remove_groups``) the map
    is general: input channel ``src[i]`` lands at output channel ``dst[i]``, the other outputs are zero.
    ``carfast_channel_map()`` reports the map; carfast's graph code treats any module with that method
    as one parameter-free step from one residual stream into another (``carfast.graph.find_group``).
    """

    def __init__(self, pad: int, in_channels: int | None = None):
        super().__init__()
        self.pad = pad
        self.in_channels = in_channels
        self.out_channels = None if in_channels is None else in_channels + 2 * pad
        self.src: list[int] | None = None
        self.dst: list[int] | None = None

    def carfast_channel_map(self) -> tuple[int, int, list[int], list[int]]:
        """(input channels, output channels, src, dst): input channel src[i] becomes output channel dst[i]."""
        if self.in_channels is None:
            raise ValueError("OptionAShortcut: in_channels is unknown; build it with OptionAShortcut(pad, in_channels)")
        if self.src is None:
            return self.in_channels, self.out_channels, list(range(self.in_channels)), \
                [c + self.pad for c in range(self.in_channels)]
        return self.in_channels, self.out_channels, list(self.src), list(self.dst)

    def set_channel_map(self, in_channels: int, out_channels: int, src: list[int], dst: list[int]) -> None:
        """Make input channel src[i] land at output channel dst[i] (the surgery's edit)."""
        set_map(self, in_channels, out_channels, src, dst)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, C, H, W] -> [N, C + 2 pad, H/2, W/2]
        x = x[:, :, ::2, ::2]
        if self.src is None:
            return F.pad(x, (0, 0, 0, 0, self.pad, self.pad))
        return apply_map(self, x)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut = OptionAShortcut((planes - in_planes) // 2, in_planes)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet-(6n+2): stem 3->16, stages of n blocks at 16, 32, 64 channels, GAP, Linear."""

    def __init__(self, depth: int, num_classes: int = 10):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"cifar_resnet: depth must be 6n+2 (20, 32, 44, 56, ...), got {depth}")
        n = (depth - 2) // 6
        self.depth = depth
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        planes, layers = 16, []
        for i, width in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(planes, width, stride))
                planes = width
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, 3, 32, 32] -> [N, classes]
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(self.flatten(self.pool(out)))


def _load_state(path) -> dict:
    obj = torch.load(path, map_location="cpu", weights_only=True)
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict (or a dict with 'state_dict'), got {type(obj).__name__}")
    # float32 for every floating tensor: a bundled float16 copy loads as the float32 network it was made from
    return {k.removeprefix("module."): (v.float() if v.is_floating_point() else v) for k, v in state.items()}


def _load_resnet_weights(model: CifarResNet, path) -> None:
    missing, unexpected = model.load_state_dict(_load_state(path), strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"{path}: does not fit ResNet-{model.depth}: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")


def cifar_resnet(depth: int = 20, pretrained: bool = True, weights: str | os.PathLike | None = None) -> CifarResNet:
    """A CIFAR-10 ResNet of ``depth`` in eval mode.

    ``pretrained=True`` loads the bundled weights (depth 20 or 56: 91.73 % and 93.39 % top-1 on the
    CIFAR-10 test set); ``weights`` loads an original checkpoint (``resnet32-*.th`` ...) instead.
    """
    model = CifarResNet(depth)
    if weights is not None:
        _load_resnet_weights(model, weights)
    elif pretrained:
        if depth not in _BUNDLED:
            raise ValueError(f"cifar_resnet: no bundled weights for depth {depth} (bundled: "
                             f"{bundled_resnet_depths()}); pass weights=PATH to an original checkpoint "
                             "or pretrained=False")
        with resources.as_file(resources.files("carfast.assets") / _BUNDLED[depth]) as p:
            _load_resnet_weights(model, p)
    model.carfast_arch = {"builder": "cifar_resnet", "kwargs": {"depth": depth}, "input_shape": [3, 32, 32]}
    return model.eval()


class AlexNetCifar(nn.Module):
    """AlexNet-shaped CIFAR-10 net: 5 convs (64 5x5 first-layer filters) and a 3-layer FC head."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 5, padding=2), nn.BatchNorm2d(64), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 5, padding=2), nn.BatchNorm2d(128), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(128, 256, 3, padding=1), nn.BatchNorm2d(256), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1), nn.BatchNorm2d(256), nn.ReLU(inplace=True),
            nn.Conv2d(256, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Dropout(0.5), nn.Linear(2048, 512), nn.ReLU(inplace=True),
            nn.Dropout(0.5), nn.Linear(512, 512), nn.ReLU(inplace=True), nn.Linear(512, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, 3, 32, 32] -> [N, classes]
        return self.classifier(self.features(x))


def alexnet_cifar(weights: str | os.PathLike | None = None, pretrained: bool = True) -> AlexNetCifar:
    """The AlexNet-style CIFAR-10 network in eval mode (input normalised by ``ALEXNET_CIFAR_NORMALIZATION``).

    ``pretrained=True`` loads the bundled weights (trained by this project; 87.35 % top-1 on the bundled
    2,000-image slice, 86.81 % on the CIFAR-10 test set); ``weights`` loads a checkpoint instead (a state
    dict, or a dict with ``state_dict``, e.g. ``shared/data/models/alexnet_cifar.pt``);
    ``pretrained=False`` and no ``weights``: randomly initialised.
    """
    model = AlexNetCifar()
    if weights is not None:
        model.load_state_dict(_load_state(weights), strict=True)
    elif pretrained:
        with resources.as_file(resources.files("carfast.assets") / _BUNDLED_ALEXNET) as p:
            model.load_state_dict(_load_state(p), strict=True)
    model.carfast_arch = {"builder": "alexnet_cifar", "kwargs": {}, "input_shape": [3, 32, 32]}
    return model.eval()
