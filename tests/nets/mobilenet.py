"""A small MobileNetV2-style network with squeeze-and-excitation, for the Torch-Pruning integration tests
and ``experiments/mobilenet_torch_pruning.py``.

Written from the architecture (Sandler et al. 2018, inverted residuals; Hu et al. 2018, squeeze-and-
excitation as placed in MobileNetV3): a stem conv, inverted residual blocks (1x1 expand -> BN -> ReLU6 ->
3x3 depthwise -> BN -> ReLU6 -> SE gate -> 1x1 project -> BN, plus the block's input where the shapes
match), a 1x1 head conv, global average pooling and a Linear classifier.

Each block's expansion channels are one coupling group: the expand conv makes them, the depthwise conv
passes them through one to one, the SE gate's second 1x1 conv (``se.fc2``) makes the gate that multiplies
them, and the SE's first conv (``se.fc1``) and the project conv read them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .basic import build

__all__ = ["MobileNetV2SE", "InvertedResidual", "SqueezeExcite", "make_mobilenet", "SHAPE", "NUM_CLASSES"]

SHAPE = (3, 16, 16)
NUM_CLASSES = 10

#: (expansion ratio, output channels, stride) of each block of the default test network
TEST_BLOCKS = ((4, 16, 1), (4, 24, 2), (4, 24, 1))


class SqueezeExcite(nn.Module):
    """x [N, C, H, W] -> x * sigmoid(fc2(relu(fc1(mean_hw(x))))) [N, C, H, W]; fc1 C -> R, fc2 R -> C (1x1 convs)."""

    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, reduced, 1)
        self.fc2 = nn.Conv2d(reduced, channels, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)                            # [N, C, 1, 1]
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class InvertedResidual(nn.Module):
    """[N, cin, H, W] -> [N, cout, H / stride, W / stride]: expand (cin -> cin * ratio), depthwise 3x3,
    SE gate (reduced to a quarter), project (-> cout, linear bottleneck); residual when shapes match."""

    def __init__(self, cin: int, cout: int, ratio: int, stride: int):
        super().__init__()
        hidden = cin * ratio
        self.expand = nn.Conv2d(cin, hidden, 1, bias=False)
        self.expand_bn = nn.BatchNorm2d(hidden)
        self.dw = nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False)
        self.dw_bn = nn.BatchNorm2d(hidden)
        self.se = SqueezeExcite(hidden, max(4, hidden // 4))
        self.project = nn.Conv2d(hidden, cout, 1, bias=False)
        self.project_bn = nn.BatchNorm2d(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        h = F.relu6(self.expand_bn(self.expand(x)))
        h = F.relu6(self.dw_bn(self.dw(h)))
        h = self.project_bn(self.project(self.se(h)))
        return x + h if self.residual else h


class MobileNetV2SE(nn.Module):
    """[N, 3, H, W] -> logits [N, num_classes]: stem 3x3 conv (stride ``stem_stride``) -> BN -> ReLU6, the
    blocks ``block1``, ``block2``... of ``blocks`` ((ratio, cout, stride) each), head 1x1 conv -> BN ->
    ReLU6, global average pool, dropout, Linear ``fc``."""

    def __init__(self, blocks=TEST_BLOCKS, stem: int = 16, head: int = 64, num_classes: int = NUM_CLASSES,
                 dropout: float = 0.0, stem_stride: int = 1):
        super().__init__()
        self.stem = nn.Conv2d(3, stem, 3, stride=stem_stride, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(stem)
        cin = stem
        self.names = []
        for i, (ratio, cout, stride) in enumerate(blocks, 1):
            setattr(self, f"block{i}", InvertedResidual(cin, cout, ratio, stride))
            self.names.append(f"block{i}")
            cin = cout
        self.head = nn.Conv2d(cin, head, 1, bias=False)
        self.head_bn = nn.BatchNorm2d(head)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(head, num_classes)

    def forward(self, x):
        x = F.relu6(self.stem_bn(self.stem(x)))
        for name in self.names:
            x = getattr(self, name)(x)
        x = F.relu6(self.head_bn(self.head(x)))
        return self.fc(self.drop(F.adaptive_avg_pool2d(x, 1).flatten(1)))

    def expand_layers(self) -> list[str]:
        """The names of the blocks' expand convs (each the root of its block's expansion group)."""
        return [f"{name}.expand" for name in self.names]


def make_mobilenet(seed: int = 0) -> MobileNetV2SE:
    """The test network (``TEST_BLOCKS``), seeded random weights and BN statistics, head calibrated so the
    logits vary from image to image (``basic.build``), eval mode; inputs ``SHAPE``."""
    return build(MobileNetV2SE(), seed, "fc", SHAPE)
