"""Small seeded synthetic networks for the exactness tests.

Each factory ``make_<name>(seed=0)`` returns a ``NetCase``: the model (random weights from
``torch.manual_seed``-style generators, BatchNorm running statistics and affine parameters randomized so
the BN shift matters, eval mode), the name of the target layer, its consumers written by hand as
``{consumer_name: width}`` (filter k owns ``[k*width, (k+1)*width)`` of dim 1 of the consumer's input),
the number of classes and the input shape. ``make_data(case, n, seed)`` gives seeded inputs and labels:
the intact model's own prediction for about 70 % of the images, a random class for the rest.

``NETS`` maps each name to its factory. ``residual_target`` is the one net whose target cannot be
scored (its channels enter a residual add); it has no consumers.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["NetCase", "NETS", "SCORABLE", "make_data", "make_inputs", "own_labels", "randomize"]

NUM_CLASSES = 10


@dataclass
class NetCase:
    name: str
    model: nn.Module
    layer: str
    consumers: dict[str, int]
    num_classes: int
    input_shape: tuple[int, ...]
    notes: dict = field(default_factory=dict)


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Seeded random weights for every layer, BN statistics and affine parameters far from identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.3)
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.5)
                m.num_batches_tracked.fill_(100)
    return model.eval()


def make_inputs(shape, n: int, g: torch.Generator) -> torch.Tensor:
    """Seeded inputs with structure that survives pooling: smooth (upsampled 4x4) noise, a per-image
    per-channel offset and a per-image contrast, plus a little white noise."""
    c, h, w = shape
    low = torch.randn((n, c, 4, 4), generator=g)
    smooth = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    offset = torch.randn((n, c, 1, 1), generator=g)
    contrast = torch.exp(0.5 * torch.randn((n, 1, 1, 1), generator=g))
    return (contrast * smooth + offset + 0.3 * torch.randn((n, c, h, w), generator=g)).contiguous()


def prune_step(pruner, model: nn.Module) -> tuple[dict, list[str]]:
    """One interactive step of a Torch-Pruning ``pruner`` of ``model``: every group it yields is pruned.
    Returns ({name of the group's root: sorted channels removed}, [the warnings' messages during it])."""
    names = {m: n for n, m in model.named_modules()}
    removed = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for group in pruner.step(interactive=True):
            removed[names[group[0].dep.target.module]] = sorted(int(i) for i in group[0].idxs)
            group.prune()
    return removed, [str(w.message) for w in caught]


def own_labels(model: nn.Module, shape, n: int, seed: int, num_classes: int):
    """(x [n, *shape], y [n]): seeded inputs (``make_inputs``) labelled with the model's own prediction,
    every third one (0, 3, 6, ...) with a random class instead."""
    g = torch.Generator().manual_seed(seed)
    x = make_inputs(shape, n, g)
    with torch.no_grad():
        y = model(x).argmax(1)
    flip = torch.arange(n) % 3 == 0
    y[flip] = torch.randint(0, num_classes, (int(flip.sum()),), generator=g)
    return x, y


def calibrate_head(model: nn.Module, fc_name: str, seed: int, input_shape, n: int = 256) -> nn.Module:
    """Rescale the last Linear so the logits vary from image to image: whiten its input features on
    seeded calibration inputs (random weights scaled by 1/std, bias centering), so random nets do not
    predict one class for everything."""
    fc = dict(model.named_modules())[fc_name]
    g = torch.Generator().manual_seed(5_000 + seed)
    feats = []
    handle = fc.register_forward_pre_hook(lambda m, args: feats.append(args[0].detach().clone()))
    try:
        with torch.no_grad():
            model(make_inputs(input_shape, n, g))
    finally:
        handle.remove()
    f = feats[0]
    mean, std = f.mean(0), f.std(0)
    std = std.clamp(min=max(float(std.median()) * 0.3, 1e-3))
    with torch.no_grad():
        w = torch.randn(fc.weight.shape, generator=g) * 3.0 / std / fc.in_features ** 0.5
        fc.weight.copy_(w)
        fc.bias.copy_(-(w @ mean) + 0.2 * torch.randn(fc.out_features, generator=g))
    return model


def build(module: nn.Module, seed: int, fc_name: str = "fc", input_shape=(3, 16, 16)) -> nn.Module:
    randomize(module, seed)
    return calibrate_head(module, fc_name, seed, input_shape).eval()


# ---------------------------------------------------------------------------------------------------
# the nets


class BnAfterAct(nn.Module):
    """stem -> target conv -> ReLU -> BN -> consumer conv -> BN -> ReLU -> GAP -> Linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 10, 3, padding=1, bias=False)   # target
        self.relu1 = nn.ReLU()
        self.bn1 = nn.BatchNorm2d(10)                              # BN after the activation
        self.conv2 = nn.Conv2d(10, 12, 3, padding=1, bias=False)  # consumer
        self.bn2 = nn.BatchNorm2d(12)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, NUM_CLASSES)

    def forward(self, x):
        x = F.relu(self.stem_bn(self.stem(x)))
        x = self.bn1(self.relu1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def make_bn_after_act(seed: int = 0) -> NetCase:
    return NetCase("bn_after_act", build(BnAfterAct(), seed), "conv1", {"conv2": 1},
                   NUM_CLASSES, (3, 16, 16))


class AlexNetHead(nn.Module):
    """conv -> ReLU -> maxpool -> target conv -> ReLU -> maxpool -> flatten -> Linear (consumer) -> ..."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),    # 16 -> 8
            nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),   # target "features.3", 8 -> 4
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Dropout(0.5), nn.Linear(12 * 4 * 4, 32), nn.ReLU(inplace=True),
            nn.Dropout(0.5), nn.Linear(32, NUM_CLASSES),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


def make_alexnet_head(seed: int = 0) -> NetCase:
    return NetCase("alexnet_head", build(AlexNetHead(), seed, "classifier.5"), "features.3", {"classifier.2": 16},
                   NUM_CLASSES, (3, 16, 16))


class MobileNetChain(nn.Module):
    """stem -> expand 1x1 (target) -> BN -> ReLU6 -> depthwise 3x3 (multiplier m) -> BN -> ReLU6
    -> project 1x1 (consumer) -> BN -> conv -> BN -> ReLU6 -> GAP -> Linear."""

    def __init__(self, mult: int = 1, dw_bias: bool = False):
        super().__init__()
        c = 12
        self.stem = nn.Conv2d(3, 8, 3, stride=1, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(8)
        self.expand = nn.Conv2d(8, c, 1, bias=False)                                   # target
        self.expand_bn = nn.BatchNorm2d(c)
        self.dw = nn.Conv2d(c, c * mult, 3, stride=2, padding=1, groups=c, bias=dw_bias)  # depthwise
        self.dw_bn = nn.BatchNorm2d(c * mult)
        self.project = nn.Conv2d(c * mult, 10, 1, bias=False)                          # consumer
        self.project_bn = nn.BatchNorm2d(10)
        self.head = nn.Conv2d(10, 16, 1, bias=False)
        self.head_bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, NUM_CLASSES)

    def forward(self, x):
        x = F.relu6(self.stem_bn(self.stem(x)))
        x = F.relu6(self.expand_bn(self.expand(x)))
        x = F.relu6(self.dw_bn(self.dw(x)))
        x = self.project_bn(self.project(x))          # linear bottleneck: no activation
        x = F.relu6(self.head_bn(self.head(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def make_mobilenet_chain(seed: int = 0) -> NetCase:
    return NetCase("mobilenet_chain", build(MobileNetChain(1), seed), "expand", {"project": 1},
                   NUM_CLASSES, (3, 16, 16), {"mult": 1})


def make_mobilenet_chain_mult2(seed: int = 0) -> NetCase:
    return NetCase("mobilenet_chain_mult2", build(MobileNetChain(2, dw_bias=True), seed), "expand",
                   {"project": 2}, NUM_CLASSES, (3, 16, 16), {"mult": 2})


class TwoConsumers(nn.Module):
    """target conv -> BN -> ReLU feeds conv_a directly and conv_b through a 3x3/1 max-pool; the two
    branches are added after their own BNs, then ReLU -> GAP -> Linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 10, 3, padding=1, bias=False)   # target
        self.bn = nn.BatchNorm2d(10)
        self.conv_a = nn.Conv2d(10, 12, 3, padding=1, bias=False)  # consumer 1
        self.bn_a = nn.BatchNorm2d(12)
        self.pool_b = nn.MaxPool2d(3, stride=1, padding=1)
        self.conv_b = nn.Conv2d(10, 12, 1, bias=False)             # consumer 2
        self.bn_b = nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, NUM_CLASSES)

    def forward(self, x):
        x = F.relu(self.stem_bn(self.stem(x)))
        h = F.relu(self.bn(self.conv(x)))
        a = self.bn_a(self.conv_a(h))
        b = self.bn_b(self.conv_b(self.pool_b(h)))
        y = F.relu(a + b)
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


def make_two_consumers(seed: int = 0) -> NetCase:
    return NetCase("two_consumers", build(TwoConsumers(), seed), "conv", {"conv_a": 1, "conv_b": 1},
                   NUM_CLASSES, (3, 16, 16))


class LinearTarget(nn.Module):
    """conv features -> flatten -> fc1 -> ReLU -> fc2 (target) -> ReLU -> Dropout -> fc3 (consumer)
    -> ReLU -> fc4."""

    def __init__(self, bn: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(8 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 24)              # target
        self.bn2 = nn.BatchNorm1d(24) if bn else nn.Identity()
        self.drop = nn.Dropout(0.3)
        self.fc3 = nn.Linear(24, 16)              # consumer
        self.fc4 = nn.Linear(16, NUM_CLASSES)

    def forward(self, x):
        x = self.pool(F.relu(self.conv(x))).flatten(1)
        x = F.relu(self.fc1(x))
        x = self.drop(F.relu(self.bn2(self.fc2(x))))
        x = F.relu(self.fc3(x))
        return self.fc4(x)


def make_linear_target(seed: int = 0) -> NetCase:
    return NetCase("linear_target", build(LinearTarget(), seed, "fc4"), "fc2", {"fc3": 1},
                   NUM_CLASSES, (3, 16, 16))


def make_linear_bn_target(seed: int = 0) -> NetCase:
    return NetCase("linear_bn_target", build(LinearTarget(bn=True), seed, "fc4"), "fc2", {"fc3": 1},
                   NUM_CLASSES, (3, 16, 16))


class ConvBias(nn.Module):
    """convs with bias; target -> ReLU -> AvgPool2d -> consumer (bias) -> ReLU -> AvgPool2d -> conv -> GAP -> Linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 10, 3, padding=1)    # target
        self.pool2 = nn.AvgPool2d(2)
        self.conv3 = nn.Conv2d(10, 12, 3, padding=1)   # consumer
        self.pool3 = nn.AvgPool2d(2)
        self.conv4 = nn.Conv2d(12, 16, 3, padding=1)
        self.fc = nn.Linear(16, NUM_CLASSES)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = self.pool2(F.relu(self.conv2(x)))
        x = self.pool3(F.relu(self.conv3(x)))
        x = F.relu(self.conv4(x))
        return self.fc(x.mean(dim=(2, 3)))


def make_conv_bias(seed: int = 0) -> NetCase:
    return NetCase("conv_bias", build(ConvBias(), seed), "conv2", {"conv3": 1}, NUM_CLASSES, (3, 16, 16))


class NonzeroAct(nn.Module):
    """target conv (bias) -> BN -> Sigmoid (f(0) != 0) -> AvgPool2d -> consumer conv -> BN -> ReLU -> GAP -> Linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 10, 3, padding=1)     # target
        self.bn = nn.BatchNorm2d(10)
        self.act = nn.Sigmoid()
        self.pool = nn.AvgPool2d(2)
        self.consumer = nn.Conv2d(10, 12, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, NUM_CLASSES)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = self.pool(self.act(self.bn(self.conv(x))))
        x = F.relu(self.bn2(self.consumer(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def make_nonzero_act(seed: int = 0) -> NetCase:
    return NetCase("nonzero_act", build(NonzeroAct(), seed), "conv", {"consumer": 1},
                   NUM_CLASSES, (3, 16, 16))


class ClassifierConsumer(nn.Module):
    """stem -> target conv -> BN -> ReLU -> AdaptiveAvgPool2d(1) -> flatten -> Linear classifier (consumer)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)  # target
        self.bn = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(16, NUM_CLASSES)                              # consumer

    def forward(self, x):
        x = F.relu(self.stem_bn(self.stem(x)))
        x = self.relu(self.bn(self.conv(x)))
        return self.fc(self.flatten(self.pool(x)))


def make_classifier_consumer(seed: int = 0) -> NetCase:
    return NetCase("classifier_consumer", build(ClassifierConsumer(), seed), "conv", {"fc": 1},
                   NUM_CLASSES, (3, 16, 16))


class FunctionalOps(nn.Module):
    """Written with F.relu / F.max_pool2d / x.view in forward: target conv2 -> F.relu -> F.max_pool2d
    -> x.view(x.size(0), -1) -> fc1 (consumer, H*W features per channel) -> F.relu -> F.dropout -> fc2."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 10, 3, stride=2, padding=1)   # target, 16 -> 8
        self.fc1 = nn.Linear(10 * 4 * 4, 32)                    # consumer
        self.fc2 = nn.Linear(32, NUM_CLASSES)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)                                  # 8 -> 4
        x = x.view(x.size(0), -1)
        x = F.relu(self.fc1(x))
        x = F.dropout(x, 0.5, training=self.training)
        return self.fc2(x)


def make_functional_ops(seed: int = 0) -> NetCase:
    return NetCase("functional_ops", build(FunctionalOps(), seed, "fc2"), "conv2", {"fc1": 16},
                   NUM_CLASSES, (3, 16, 16))


class FunctionalConv(nn.Module):
    """Functional forward with a conv consumer: target conv2 -> bn -> F.relu -> F.avg_pool2d -> conv3
    (consumer) -> torch.relu -> torch.flatten(F.adaptive_avg_pool2d(., 1), 1) -> fc."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(8, 10, 3, padding=1, bias=False)  # target
        self.bn2 = nn.BatchNorm2d(10)
        self.conv3 = nn.Conv2d(10, 12, 3, padding=1)             # consumer
        self.fc = nn.Linear(12, NUM_CLASSES)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.avg_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = torch.relu(self.conv3(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def make_functional_conv(seed: int = 0) -> NetCase:
    return NetCase("functional_conv", build(FunctionalConv(), seed), "conv2", {"conv3": 1},
                   NUM_CLASSES, (3, 16, 16))


class GroupedConsumer(nn.Module):
    """target conv -> BN -> ReLU -> consumer conv with groups=2 -> BN -> ReLU -> GAP -> Linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 12, 3, padding=1, bias=False)                # target
        self.bn = nn.BatchNorm2d(12)
        self.gconv = nn.Conv2d(12, 16, 3, padding=1, groups=2, bias=True)     # consumer, 6 in-channels per group
        self.gbn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, NUM_CLASSES)

    def forward(self, x):
        x = F.relu(self.stem_bn(self.stem(x)))
        x = F.relu(self.bn(self.conv(x)))
        x = F.relu(self.gbn(self.gconv(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def make_grouped_consumer(seed: int = 0) -> NetCase:
    return NetCase("grouped_consumer", build(GroupedConsumer(), seed), "conv", {"gconv": 1},
                   NUM_CLASSES, (3, 16, 16))


class ResidualBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + x)


class ResidualTarget(nn.Module):
    """stem -> basic block (target: block.conv2, whose channels enter the residual add) -> GAP -> Linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(8)
        self.block = ResidualBlock(8)
        self.fc = nn.Linear(8, NUM_CLASSES)

    def forward(self, x):
        x = F.relu(self.stem_bn(self.stem(x)))
        x = self.block(x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def make_residual_target(seed: int = 0) -> NetCase:
    return NetCase("residual_target", build(ResidualTarget(), seed), "block.conv2", {},
                   NUM_CLASSES, (3, 16, 16), {"coupled": True})


class Untraceable(nn.Module):
    """Data-dependent Python control flow (``if x.sum() > 0``, ``.item()``) that torch.fx cannot trace;
    the two branches compute the same thing. stem -> target conv -> BN -> ReLU -> consumer conv -> ..."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 10, 3, padding=1, bias=False)      # target
        self.bn = nn.BatchNorm2d(10)
        self.consumer = nn.Conv2d(10, 12, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, NUM_CLASSES)

    def forward(self, x):
        # the control flow reads only the input and the stem, never the target's channels
        repeats = int(x.abs().max().item() >= 0)            # always 1, but data-dependent
        x = self.stem_bn(self.stem(x))
        if x.sum() > 0:                     # both branches: ReLU
            x = F.relu(x)
        else:
            x = torch.clamp(x, min=0)
        x = F.relu(self.bn(self.conv(x)))
        for _ in range(repeats):            # runs exactly once
            x = self.consumer(x)
        x = F.relu(self.bn2(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def make_untraceable(seed: int = 0) -> NetCase:
    return NetCase("untraceable", build(Untraceable(), seed), "conv", {"consumer": 1},
                   NUM_CLASSES, (3, 16, 16))


NETS = {
    "bn_after_act": make_bn_after_act,
    "alexnet_head": make_alexnet_head,
    "mobilenet_chain": make_mobilenet_chain,
    "mobilenet_chain_mult2": make_mobilenet_chain_mult2,
    "two_consumers": make_two_consumers,
    "linear_target": make_linear_target,
    "linear_bn_target": make_linear_bn_target,
    "conv_bias": make_conv_bias,
    "nonzero_act": make_nonzero_act,
    "classifier_consumer": make_classifier_consumer,
    "functional_ops": make_functional_ops,
    "functional_conv": make_functional_conv,
    "grouped_consumer": make_grouped_consumer,
    "residual_target": make_residual_target,
    "untraceable": make_untraceable,
}

#: the nets whose target can be scored (all but the residual one)
SCORABLE = [name for name in NETS if name != "residual_target"]


def make_data(case: NetCase, n: int, seed: int = 0, own_fraction: float = 0.7):
    """Seeded inputs [n, *input_shape] and labels: the intact model's prediction for ~own_fraction of
    the images, a uniformly random class for the rest."""
    g = torch.Generator().manual_seed(10_000 + seed)
    x = make_inputs(case.input_shape, n, g)
    model = case.model
    flags = {name: m.training for name, m in model.named_modules()}
    model.eval()
    try:
        with torch.no_grad():
            pred = model(x).argmax(dim=1)
    finally:
        for name, m in model.named_modules():
            m.training = flags[name]
    random_labels = torch.randint(0, case.num_classes, (n,), generator=g)
    use_own = torch.rand(n, generator=g) < own_fraction
    y = torch.where(use_own, pred, random_labels)
    return x, y.to(torch.int64)
