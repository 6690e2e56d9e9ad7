"""Small seeded networks of the architecture families the channel-flow analysis must follow.

Each is written from the architecture, not copied from a model zoo: a dense block, inception branches,
a fire module, a shuffle unit, squeeze-and-excitation, a ConvNeXt block, an HRNet-style fuse, a CSP
stage, a Ghost bottleneck and split attention, plus moves of channels (flip, permute to NHWC). For each
``Family`` lists its targets, and for each target how to remove unit k *by hand* (``Removal``): the
reader modules and the input indices k owns there (``readers``; ``dims`` gives a reader's channel dim,
-1 for a Linear on NHWC), the normalisers that renormalise without k (``norms``), and readers that are
functional calls, removed by zeroing the weight columns k owns (``columns``). ``tests/naive.py`` turns
that into the naive reference; ``refused`` maps layers carfast must refuse to a regex of the message.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .basic import build

__all__ = ["Removal", "Target", "Family", "FAMILIES"]

C = 5                      # classes
SHAPE = (3, 12, 12)


@dataclass
class Removal:
    readers: dict = field(default_factory=dict)          # module -> k -> input indices
    norms: dict = field(default_factory=dict)            # normaliser module -> k -> indices it drops
    columns: dict = field(default_factory=dict)          # parameter path -> k -> weight columns to zero
    dims: dict = field(default_factory=dict)             # reader / norm module -> its channel dim (default 1)


@dataclass
class Target:
    layer: str
    group: bool                                          # score_group / remove_groups
    units: int
    removal: Removal
    maskable: bool = True                                # to_masks can express it


@dataclass
class Family:
    name: str
    model: nn.Module
    targets: list
    refused: dict = field(default_factory=dict)          # layer -> regex of score_layer's refusal (or of
    group_refused: dict = field(default_factory=dict)    # score_group's, for a group carfast cannot cut)
    input_shape: tuple = SHAPE
    num_classes: int = C


def _ks(*offsets):
    return lambda k: [o + k for o in offsets]


def _head(cin):
    return nn.Linear(cin, C)


def _gap(x):
    return x.mean((2, 3))


def _randomize_norms(model, seed):
    g = torch.Generator().manual_seed(seed + 77)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, nn.GroupNorm)) and m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.3)
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return model


def _conv(cin, cout, k=3, **kw):
    return nn.Conv2d(cin, cout, k, padding=kw.pop("padding", k // 2), **kw)


# ---- dense block ----------------------------------------------------------------------------------------
class DenseLayer(nn.Module):
    def __init__(self, cin, growth):
        super().__init__()
        self.norm1, self.conv1 = nn.BatchNorm2d(cin), _conv(cin, 8, 1)
        self.norm2, self.conv2 = nn.BatchNorm2d(8), _conv(8, growth)

    def forward(self, feats):
        x = torch.cat(feats, 1)
        return self.conv2(F.relu(self.norm2(self.conv1(F.relu(self.norm1(x))))))


class DenseNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = _conv(3, 6)
        self.l1, self.l2 = DenseLayer(6, 4), DenseLayer(10, 4)
        self.trans_norm, self.trans = nn.BatchNorm2d(14), _conv(14, 8, 1)
        self.fc = _head(8)

    def forward(self, x):
        feats = [self.stem(x)]
        feats.append(self.l1(feats))
        feats.append(self.l2(feats))
        t = F.avg_pool2d(self.trans(F.relu(self.trans_norm(torch.cat(feats, 1)))), 2)
        return self.fc(_gap(t))


def dense(seed=0):
    m = build(DenseNet(), seed, input_shape=SHAPE)
    return Family("dense_block", m, [
        Target("l1.conv2", False, 4, Removal({"l2.conv1": _ks(6), "trans": _ks(6)})),
        Target("stem", False, 6, Removal({"l1.conv1": _ks(0), "l2.conv1": _ks(0), "trans": _ks(0)})),
    ])


# ---- inception branches -------------------------------------------------------------------------------
class Inception(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.b1, self.b2a, self.b2b, self.b3 = _conv(c, 4, 1), _conv(c, 4, 1), _conv(4, 6), _conv(c, 2, 1)

    def forward(self, x):
        b3 = self.b3(F.max_pool2d(x, 3, 1, 1))
        return torch.cat([F.relu(self.b1(x)), F.relu(self.b2b(F.relu(self.b2a(x)))), F.relu(b3)], 1)


class InceptionNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.inc, self.post, self.fc = _conv(3, 8), Inception(8), _conv(12, 8), _head(8)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(F.relu(self.post(self.inc(F.relu(self.stem(x))))), 1), 1))


def inception(seed=0):
    m = build(InceptionNet(), seed, input_shape=SHAPE)
    return Family("inception", m, [
        Target("inc.b2b", False, 6, Removal({"post": _ks(4)})),
        Target("stem", False, 8, Removal({"inc.b1": _ks(0), "inc.b2a": _ks(0), "inc.b3": _ks(0)})),
    ])


# ---- fire module ------------------------------------------------------------------------------------------
class Fire(nn.Module):
    def __init__(self, cin, squeeze, expand):
        super().__init__()
        self.squeeze = _conv(cin, squeeze, 1)
        self.e1, self.e3 = _conv(squeeze, expand, 1), _conv(squeeze, expand)

    def forward(self, x):
        s = F.relu(self.squeeze(x))
        return torch.cat([F.relu(self.e1(s)), F.relu(self.e3(s))], 1)


class FireNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.fire, self.fire2, self.fc = _conv(3, 8), Fire(8, 4, 6), Fire(12, 4, 4), _head(8)

    def forward(self, x):
        x = F.max_pool2d(self.fire(F.relu(self.stem(x))), 2)
        return self.fc(_gap(self.fire2(x)))


def fire(seed=0):
    m = build(FireNet(), seed, input_shape=SHAPE)
    return Family("fire", m, [
        Target("fire.e3", False, 6, Removal({"fire2.squeeze": _ks(6)})),
        Target("fire.e1", False, 6, Removal({"fire2.squeeze": _ks(0)})),     # the first slice of a concat
        Target("fire.squeeze", False, 4, Removal({"fire.e1": _ks(0), "fire.e3": _ks(0)})),
    ])


# ---- shuffle unit, and other moves of channels -------------------------------------------------------------
def channel_shuffle(x, groups):
    n, c, h, w = x.size()
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleUnit(nn.Module):
    def __init__(self, c):
        super().__init__()
        h = c // 2
        self.branch = nn.Sequential(_conv(h, h, 1), nn.BatchNorm2d(h), nn.ReLU(), _conv(h, h, groups=h),
                                    nn.BatchNorm2d(h), _conv(h, h, 1), nn.BatchNorm2d(h), nn.ReLU())

    def forward(self, x):
        x1, x2 = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat([x1, self.branch(x2)], 1), 2)


class ShuffleNet(nn.Module):
    """A shuffle unit, then moves that keep whole channels: flip, NHWC and a Linear there, a transpose."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn = _conv(3, 8), nn.BatchNorm2d(8)
        self.unit = ShuffleUnit(8)
        self.a = _conv(8, 6, 1)
        self.lin = nn.Linear(6, 4)
        self.b, self.fc = _conv(4, 6, 1), _head(6)

    def forward(self, x):
        x = self.unit(F.relu(self.bn(self.stem(x))))
        y = torch.flip(F.relu(self.a(x)), dims=[1]).permute(0, 2, 3, 1)      # NHWC, channels reversed
        y = F.relu(self.lin(y)).permute(0, 3, 1, 2).transpose(2, 3)
        return self.fc(_gap(F.relu(self.b(y))))


def shuffle(seed=0):
    m = build(ShuffleNet(), seed, input_shape=SHAPE)
    return Family("shuffle", m, [
        Target("unit.branch.0", False, 4, Removal({"unit.branch.5": _ks(0)})),
        Target("a", False, 6, Removal({"lin": lambda k: [5 - k]}, dims={"lin": -1})),
        Target("lin", False, 4, Removal({"b": _ks(0)})),
    ], refused={"unit.branch.5": r"spread over several axes .* view", "stem": r"spread over several axes"})


# ---- squeeze-and-excitation ---------------------------------------------------------------------------------
class SENet(nn.Module):
    """conv -> BN -> ReLU -> x * sigmoid(expand(relu(reduce(mean(x))))) -> project (functional) -> head."""

    def __init__(self, traceable=True):
        super().__init__()
        self.traceable = traceable
        self.conv, self.bn = _conv(3, 8), nn.BatchNorm2d(8)
        self.reduce, self.expand = _conv(8, 4, 1), _conv(4, 8, 1)
        self.project_w = nn.Parameter(torch.randn(6, 8, 3, 3) * 0.3)
        self.project_b = nn.Parameter(torch.randn(6) * 0.1)
        self.post_bn, self.fc = nn.BatchNorm2d(6), _head(6)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        if not self.traceable and bool(x.abs().sum() < 0):     # data-dependent: torch.fx cannot trace this
            x = -x
        s = torch.sigmoid(self.expand(F.relu(self.reduce(x.mean((2, 3), keepdim=True)))))
        y = F.conv2d(x * s, self.project_w, self.project_b, padding=1)
        return self.fc(F.relu(self.post_bn(y)).mean((2, 3)))


def se(seed=0, traceable=True):
    m = build(SENet(traceable), seed, input_shape=SHAPE)
    main = Removal({"reduce": _ks(0)}, columns={"project_w": _ks(0)})
    return Family("se" if traceable else "se_untraceable", m, [
        Target("conv", False, 8, main),
        Target("reduce", False, 4, Removal({"expand": _ks(0)})),
        Target("expand", True, 8, main),
    ], refused={"expand": r"gated side of a multiplication.*score_group"})


# ---- ConvNeXt block ----------------------------------------------------------------------------------------
class LayerNorm2d(nn.LayerNorm):
    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


class DropPath(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        keep = torch.rand(x.shape[0], 1, 1, 1, device=x.device) >= self.p
        return x * keep / (1 - self.p)


class ConvNeXtBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.dw = _conv(c, c, 7, groups=c)
        self.norm = nn.LayerNorm(c)
        self.pw1, self.pw2 = nn.Linear(c, 2 * c), nn.Linear(2 * c, c)
        self.gamma = nn.Parameter(torch.ones(c))
        self.drop = DropPath(0.1)

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.pw2(F.gelu(self.pw1(self.norm(y)))).permute(0, 3, 1, 2)
        return x + self.drop(y * self.gamma.reshape(1, -1, 1, 1))        # layer scale, as timm writes it


class ConvNeXtNet(nn.Module):
    def __init__(self, traceable=True):
        super().__init__()
        self.traceable = traceable
        self.stem, self.stem_norm = _conv(3, 8, 2, stride=2, padding=0), LayerNorm2d(8)
        self.block, self.head_norm, self.fc = ConvNeXtBlock(8), nn.LayerNorm(8), _head(8)

    def forward(self, x):
        x = self.block(self.stem_norm(self.stem(x)))
        if not self.traceable and bool(x.isnan().any()):       # data-dependent: torch.fx cannot trace this
            x = x.nan_to_num()
        return self.fc(self.head_norm(x.mean((2, 3))))


def convnext(seed=0, traceable=True):
    m = _randomize_norms(build(ConvNeXtNet(traceable), seed, input_shape=SHAPE), seed)
    stream = Removal({"block.pw1": _ks(0), "fc": _ks(0)}, norms={"stem_norm": _ks(0), "block.norm": _ks(0),
                                                                   "head_norm": _ks(0)},
                     dims={"block.pw1": -1, "fc": -1, "block.norm": -1, "head_norm": -1})
    return Family("convnext" if traceable else "convnext_untraceable", m, [
        Target("stem", True, 8, stream, maskable=False),
        Target("block.dw", True, 8, stream, maskable=False),
        Target("block.pw1", False, 16, Removal({"block.pw2": _ks(0)}, dims={"block.pw2": -1})),
    ], refused={"stem": r"residual add.*score_group"})


# ---- HRNet-style fuse ----------------------------------------------------------------------------------------
class HRFuse(nn.Module):
    def __init__(self):
        super().__init__()
        self.h, self.h_bn = _conv(3, 6), nn.BatchNorm2d(6)
        self.l, self.l_bn = _conv(6, 8, stride=2), nn.BatchNorm2d(8)
        self.up = nn.Sequential(_conv(8, 6, 1), nn.BatchNorm2d(6), nn.Upsample(scale_factor=2, mode="nearest"))
        self.down = nn.Sequential(_conv(6, 8, stride=2), nn.BatchNorm2d(8))
        self.fc = _head(14)

    def forward(self, x):
        xh = F.relu(self.h_bn(self.h(x)))
        xl = F.relu(self.l_bn(self.l(xh)))
        yh, yl = F.relu(xh + self.up(xl)), F.relu(xl + self.down(xh))
        return self.fc(torch.cat([_gap(yh), _gap(yl)], 1))


def hrnet(seed=0):
    m = build(HRFuse(), seed, input_shape=SHAPE)
    return Family("hrnet_fuse", m, [
        Target("up.0", True, 6, Removal({"l": _ks(0), "down.0": _ks(0), "fc": _ks(0)})),
        Target("h", True, 6, Removal({"l": _ks(0), "down.0": _ks(0), "fc": _ks(0)})),
    ], refused={"up.0": r"residual add"})


# ---- CSP stage ---------------------------------------------------------------------------------------------------
class CSPBottleneck(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c1, self.bn1, self.c2, self.bn2 = _conv(c, c, 1), nn.BatchNorm2d(c), _conv(c, c), nn.BatchNorm2d(c)

    def forward(self, x):
        return x + self.bn2(self.c2(F.relu(self.bn1(self.c1(x)))))


class CSPNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.exp, self.exp_bn = _conv(3, 8), _conv(8, 8, 1), nn.BatchNorm2d(8)
        self.blocks = nn.Sequential(CSPBottleneck(4), CSPBottleneck(4))
        self.tb, self.trans, self.fc = _conv(4, 4, 1), _conv(8, 8, 1), _head(8)

    def forward(self, x):
        x = F.relu(self.exp_bn(self.exp(F.relu(self.stem(x)))))
        xs, xb = x.split(4, dim=1)
        return self.fc(_gap(F.relu(self.trans(torch.cat([xs, self.tb(self.blocks(xb))], 1)))))


def csp(seed=0):
    m = build(CSPNet(), seed, input_shape=SHAPE)
    return Family("csp", m, [
        Target("tb", False, 4, Removal({"trans": _ks(4)})),
        Target("blocks.0.c1", False, 4, Removal({"blocks.0.c2": _ks(0)})),
        Target("blocks.1.c2", True, 4, Removal({"blocks.0.c1": _ks(0), "blocks.1.c1": _ks(0), "tb": _ks(0)})),
    ], refused={"exp": r"residual add", "blocks.1.c2": r"residual add"},
        group_refused={"exp": r"split would not select the same channels"})


# ---- Ghost bottleneck --------------------------------------------------------------------------------------------
class Ghost(nn.Module):
    def __init__(self, cin, out, relu):
        super().__init__()
        init = out // 2
        act = [nn.ReLU()] if relu else []
        self.primary = nn.Sequential(_conv(cin, init, 1), nn.BatchNorm2d(init), *act)
        self.cheap = nn.Sequential(_conv(init, init, groups=init), nn.BatchNorm2d(init), *act)
        self.out = out

    def forward(self, x):
        x1 = self.primary(x)
        return torch.cat([x1, self.cheap(x1)], 1)[:, :self.out]


class GhostNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.bn = _conv(3, 8), nn.BatchNorm2d(8)
        self.g1, self.g2, self.fc = Ghost(8, 12, True), Ghost(12, 8, False), _head(8)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        return self.fc(_gap(x + self.g2(self.g1(x))))


def ghost(seed=0):
    m = build(GhostNet(), seed, input_shape=SHAPE)
    pair = Removal({"g1.primary.0": _ks(0, 4), "fc": _ks(0, 4)})
    return Family("ghost", m, [
        Target("g1.primary.0", False, 6, Removal({"g2.primary.0": _ks(0, 6)})),
        Target("g1.cheap.0", True, 6, Removal({"g2.primary.0": _ks(0, 6)})),
        Target("g2.primary.0", True, 4, pair),
        Target("stem", True, 4, pair),
    ], refused={"g2.primary.0": r"residual add", "stem": r"residual add|meet"})


# ---- split attention ---------------------------------------------------------------------------------------------
class SplitAttn(nn.Module):
    def __init__(self, c, radix=2):
        super().__init__()
        self.radix = radix
        self.conv, self.bn0 = _conv(c, c * radix), nn.BatchNorm2d(c * radix)
        self.fc1, self.bn1, self.fc2 = _conv(c, 4, 1), nn.BatchNorm2d(4), _conv(4, c * radix, 1)

    def forward(self, x):
        x = F.relu(self.bn0(self.conv(x)))
        b, rc, h, w = x.shape
        x = x.reshape(b, self.radix, rc // self.radix, h, w)
        gap = F.relu(self.bn1(self.fc1(x.sum(1).mean((2, 3), keepdim=True))))
        attn = self.fc2(gap).view(b, 1, self.radix, -1).transpose(1, 2)
        attn = F.softmax(attn, dim=1).reshape(b, -1).view(b, -1, 1, 1).reshape(b, self.radix, rc // self.radix, 1, 1)
        return (x * attn).sum(1)


class SplitAttnNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.sa, self.post, self.fc = _conv(3, 8), SplitAttn(8), _conv(8, 6), _head(6)

    def forward(self, x):
        return self.fc(_gap(F.relu(self.post(self.sa(F.relu(self.stem(x)))))))


def split_attention(seed=0):
    m = build(SplitAttnNet(), seed, input_shape=SHAPE)
    return Family("split_attention", m, [
        Target("sa.fc1", False, 4, Removal({"sa.fc2": _ks(0)})),
        Target("sa.conv", True, 8, Removal({"sa.fc1": _ks(0), "post": _ks(0)})),
        Target("stem", False, 8, Removal({"sa.conv": _ks(0)})),
    ], refused={"sa.conv": r"filters 0 and 8 meet at sum"})


# ---- GroupNorm: one group (normalises across channels), one group per channel, and two groups -------------
class GroupNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.gn1 = _conv(3, 8), nn.GroupNorm(1, 8)
        self.conv2, self.gn2 = _conv(8, 6), nn.GroupNorm(6, 6)
        self.conv3, self.gn3 = _conv(6, 6), nn.GroupNorm(2, 6)
        self.conv4, self.fc = _conv(6, 6, 1), _head(6)

    def forward(self, x):
        x = F.relu(self.gn1(self.stem(x)))
        x = F.relu(self.gn2(self.conv2(x)))
        return self.fc(_gap(self.conv4(F.relu(self.gn3(self.conv3(x))))))


def group_norm(seed=0):
    m = _randomize_norms(build(GroupNormNet(), seed, input_shape=SHAPE), seed)
    return Family("group_norm", m, [
        Target("stem", False, 8, Removal({"conv2": _ks(0)}, norms={"gn1": _ks(0)}), maskable=False),
        Target("conv2", False, 6, Removal({"conv3": _ks(0)})),
    ], refused={"conv3": r"GroupNorm with 2 groups of 3 channels"})


FAMILIES = {f.__name__: f for f in (dense, inception, fire, shuffle, se, convnext, hrnet, csp, ghost, split_attention,
                                    group_norm)}
FAMILIES["se_untraceable"] = lambda seed=0: se(seed, traceable=False)
FAMILIES["convnext_untraceable"] = lambda seed=0: convnext(seed, traceable=False)
