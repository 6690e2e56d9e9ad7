"""Networks whose removals are checked against a deletion built by hand: the same architecture built
again at the smaller widths, every tensor copied without the deleted channels' slices.

Two families had a score differ from a physical deletion in the model zoo (issue 24); each is written
here from its architecture, small and seeded:

- ``repvgg``: RepVGG blocks, relu(BN(conv3x3(x)) + BN(conv1x1(x)) + BN(x)), the last branch an identity
  BatchNorm where the block keeps its width and resolution. Both branch convs of a block read the
  residual stream and write it, so each is a reader of its own coupling group.
- ``self_residual``: the same rule in its barest form, h + conv(h) on a feature map and z + linear(z)
  on a feature vector, and a depthwise conv added to its input (h + dw(h)).
- ``selective_kernel``: a selective-kernel convolution (the input split between two paths of different
  dilation, the paths stacked, summed and pooled, an attention ``view(b, paths, C, 1, 1)`` softmaxed
  across the paths for each channel, the paths summed under it). Channel c of the paths is one unit of
  a group; the attention conv loses its rows c and C + c with it.

``HandDeletion(make, spec)`` builds a network with ``units`` of a target deleted: ``make(removed)`` is the
architecture at the smaller widths, ``spec(keep)`` says, for every tensor that loses entries, which dim
and which entries it keeps (``keep``: the target's unit indices that remain). Every other tensor is
copied whole. This is the reference: what a physically smaller network computes, with nothing of
carfast's in it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .basic import build

__all__ = ["HandTarget", "HandFamily", "HAND_FAMILIES", "SHAPE", "C", "copy_sliced"]

C = 5                      # classes
SHAPE = (3, 12, 12)


def copy_sliced(src: nn.Module, dst: nn.Module, spec: dict) -> nn.Module:
    """Copy every tensor of ``src``'s state dict into ``dst``'s, keeping only the entries ``spec[name] =
    {dim: indices}`` lists (a tensor not in ``spec`` is copied whole); ``dst`` must have the shapes that
    result, or the copy fails."""
    with torch.no_grad():
        dst_state = dst.state_dict()
        for name, t in src.state_dict().items():
            for dim, idx in spec.get(name, {}).items():
                t = t.index_select(dim, torch.as_tensor(idx, dtype=torch.long))
            if dst_state[name].shape != t.shape:
                raise AssertionError(f"{name}: the hand-built network has {tuple(dst_state[name].shape)}, the "
                                     f"slices {tuple(t.shape)}")
            dst_state[name].copy_(t)
    return dst.eval()


@dataclass
class HandTarget:
    layer: str
    group: bool                                  # score_group / remove_groups
    units: int
    make: object                                 # make(removed: int) -> the architecture at smaller widths
    spec: object                                 # spec(keep: list[int]) -> {tensor name: {dim: indices}}

    def deleted(self, model: nn.Module, units) -> nn.Module:
        """``model`` with ``units`` (an int or a list) deleted, built by hand."""
        units = {units} if isinstance(units, int) else set(units)
        keep = [k for k in range(self.units) if k not in units]
        return copy_sliced(model, self.make(len(units)), self.spec(keep))


@dataclass
class HandFamily:
    name: str
    model: nn.Module
    targets: list
    refused: dict                                # layer -> regex of carfast's refusal (score_layer and score_group)


def _rows(names, keep):
    return {n: {0: keep} for n in names}


def _bn(prefix, keep):
    return _rows([f"{prefix}.{a}" for a in ("weight", "bias", "running_mean", "running_var")], keep)


def _gap(x):
    return x.mean((2, 3))


# ---- RepVGG ------------------------------------------------------------------------------------------------
class RepVGGBlock(nn.Module):
    """relu(bn_kxk(conv_kxk(x)) + bn_1x1(conv_1x1(x)) [+ identity(x)]), identity a BatchNorm when the block
    keeps the width and the resolution (RepVGG's training-time form)."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv_kxk, self.bn_kxk = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv_1x1, self.bn_1x1 = nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
        self.identity = nn.BatchNorm2d(cout) if cin == cout and stride == 1 else None

    def forward(self, x):
        y = self.bn_kxk(self.conv_kxk(x)) + self.bn_1x1(self.conv_1x1(x))
        if self.identity is not None:
            y = y + self.identity(x)
        return F.relu(y)


class RepVGGNet(nn.Module):
    def __init__(self, stem=6, width=8, traceable=True):
        super().__init__()
        self.traceable = traceable
        self.stem, self.stem_bn = nn.Conv2d(3, stem, 3, padding=1), nn.BatchNorm2d(stem)
        self.b0 = RepVGGBlock(stem, width, stride=2)         # no identity: the stream starts here
        self.b1, self.b2 = RepVGGBlock(width, width), RepVGGBlock(width, width)
        self.fc = nn.Linear(width, C)

    def forward(self, x):
        x = F.relu(self.stem_bn(self.stem(x)))
        if not self.traceable and bool(x.abs().sum() < 0):     # data-dependent: torch.fx cannot trace this
            x = -x
        return self.fc(_gap(self.b2(self.b1(self.b0(x)))))


def _repvgg_stem(keep):
    """Stem channels: its conv's rows and BatchNorm, the first block's input channels."""
    return {**_rows(["stem.weight", "stem.bias"], keep), **_bn("stem_bn", keep),
            "b0.conv_kxk.weight": {1: keep}, "b0.conv_1x1.weight": {1: keep}}


def _repvgg_stream(keep):
    """Stream channels: every block's outputs (convs, BatchNorms, identity BatchNorms), the inputs of the
    blocks that read the stream (b1, b2: both branches) and of the classifier."""
    spec = {"fc.weight": {1: keep}}
    for b in ("b0", "b1", "b2"):
        spec.update(_rows([f"{b}.conv_kxk.weight", f"{b}.conv_1x1.weight"], keep))
        spec.update({**_bn(f"{b}.bn_kxk", keep), **_bn(f"{b}.bn_1x1", keep)})
    for b in ("b1", "b2"):
        spec.update(_bn(f"{b}.identity", keep))
        spec[f"{b}.conv_kxk.weight"] = {0: keep, 1: keep}
        spec[f"{b}.conv_1x1.weight"] = {0: keep, 1: keep}
    return spec


def repvgg(seed=0, traceable=True):
    m = build(RepVGGNet(traceable=traceable), seed, input_shape=SHAPE)
    stream = dict(group=True, units=8, make=lambda r: RepVGGNet(width=8 - r, traceable=traceable),
                  spec=_repvgg_stream)
    return HandFamily("repvgg" if traceable else "repvgg_untraceable", m, [
        HandTarget("stem", False, 6, lambda r: RepVGGNet(stem=6 - r, traceable=traceable), _repvgg_stem),
        HandTarget("b0.conv_1x1", **stream),          # writes the stream, reads the stem
        HandTarget("b1.conv_1x1", **stream),          # reads and writes the stream
        HandTarget("b2.conv_kxk", **stream),
    ], refused={})


# ---- a layer added to its own input -------------------------------------------------------------------------
class SelfResidualNet(nn.Module):
    """h = relu(stem(x)); h = relu(h + mix(h)); h = h + pos(h) (a depthwise conv, a positional encoding
    of this kind); z = proj(gap(h)); z = relu(z + lin(z)); fc(z)."""

    def __init__(self, width=8, feat=6):
        super().__init__()
        self.stem, self.mix = nn.Conv2d(3, width, 3, padding=1), nn.Conv2d(width, width, 3, padding=1)
        self.pos = nn.Conv2d(width, width, 3, padding=1, groups=width)
        self.proj, self.lin, self.fc = nn.Linear(width, feat), nn.Linear(feat, feat), nn.Linear(feat, C)

    def forward(self, x):
        h = F.relu(self.stem(x))
        h = F.relu(h + self.mix(h))
        h = h + self.pos(h)
        z = self.proj(_gap(h))
        return self.fc(F.relu(z + self.lin(z)))


def self_residual(seed=0):
    m = build(SelfResidualNet(), seed, input_shape=SHAPE)
    maps = dict(group=True, units=8, make=lambda r: SelfResidualNet(width=8 - r),
                spec=lambda keep: {**_rows(["stem.weight", "stem.bias", "mix.bias", "pos.weight", "pos.bias"], keep),
                                   "mix.weight": {0: keep, 1: keep}, "proj.weight": {1: keep}})
    vectors = dict(group=True, units=6, make=lambda r: SelfResidualNet(feat=6 - r),
                   spec=lambda keep: {**_rows(["proj.weight", "proj.bias", "lin.bias"], keep),
                                      "lin.weight": {0: keep, 1: keep}, "fc.weight": {1: keep}})
    return HandFamily("self_residual", m, [
        HandTarget("mix", **maps), HandTarget("stem", **maps), HandTarget("pos", **maps), HandTarget("lin", **vectors),
    ], refused={})


# ---- selective kernel ---------------------------------------------------------------------------------------
class SelectiveKernel(nn.Module):
    """Two paths (3x3 convs of dilation 1 and 2, each on its half of the input), stacked [B, 2, C, H, W];
    the attention: the paths' sum, pooled, reduced and expanded to [B, 2 * C, 1, 1], viewed [B, 2, C, 1, 1]
    (row p * C + c is path p's weight for channel c) and softmaxed across the paths; out = sum over paths
    of path * attention."""

    def __init__(self, cin, cout, attn=4, paths=2):
        super().__init__()
        self.num_paths, self.split = paths, cin // paths        # a size fixed at construction, as timm's
        self.paths = nn.ModuleList(
            nn.Sequential(nn.Conv2d(cin // paths, cout, 3, padding=1 + p, dilation=1 + p, bias=False),
                          nn.BatchNorm2d(cout), nn.ReLU()) for p in range(paths))
        self.fc_reduce, self.bn = nn.Conv2d(cout, attn, 1, bias=False), nn.BatchNorm2d(attn)
        self.fc_select = nn.Conv2d(attn, cout * paths, 1, bias=False)

    def forward(self, x):
        parts = torch.split(x, self.split, 1)
        x = torch.stack([path(parts[i]) for i, path in enumerate(self.paths)], 1)
        a = self.fc_select(F.relu(self.bn(self.fc_reduce(x.sum(1).mean((2, 3), keepdim=True)))))
        b, pc, h, w = a.shape
        a = torch.softmax(a.view(b, self.num_paths, pc // self.num_paths, h, w), dim=1)
        return (x * a).sum(1)


class SKNet(nn.Module):
    def __init__(self, width=6, attn=4, post=6):
        super().__init__()
        self.stem, self.stem_bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.sk = SelectiveKernel(8, width, attn)
        self.post, self.post_bn = nn.Conv2d(width, post, 3, padding=1, bias=False), nn.BatchNorm2d(post)
        self.fc = nn.Linear(post, C)

    def forward(self, x):
        x = self.sk(F.relu(self.stem_bn(self.stem(x))))
        return self.fc(_gap(F.relu(self.post_bn(self.post(x)))))


def _sk_paths(keep, width=6):
    """Path channel c: both paths' conv rows and BatchNorms, the attention's input c and its rows c and
    width + c (path 0's and path 1's weights for channel c), the next conv's input c."""
    spec = {"sk.fc_reduce.weight": {1: keep}, "post.weight": {1: keep},
            "sk.fc_select.weight": {0: list(keep) + [width + k for k in keep]}}
    for p in range(2):
        spec.update({f"sk.paths.{p}.0.weight": {0: keep}, **_bn(f"sk.paths.{p}.1", keep)})
    return spec


def _sk_attention(keep):
    """Attention channel j: the reduce conv's row, its BatchNorm, the select conv's input."""
    return {"sk.fc_reduce.weight": {0: keep}, **_bn("sk.bn", keep), "sk.fc_select.weight": {1: keep}}


def selective_kernel(seed=0):
    m = build(SKNet(), seed, input_shape=SHAPE)
    paths = dict(group=True, units=6, make=lambda r: SKNet(width=6 - r), spec=_sk_paths)
    return HandFamily("selective_kernel", m, [
        HandTarget("sk.paths.1.0", **paths), HandTarget("sk.paths.0.0", **paths),
        HandTarget("sk.fc_select", **paths),           # named by the attention conv: the same group
        HandTarget("sk.fc_reduce", False, 4, lambda r: SKNet(attn=4 - r), _sk_attention),
        HandTarget("post", False, 6, lambda r: SKNet(post=6 - r),
                   lambda keep: {"post.weight": {0: keep}, **_bn("post_bn", keep), "fc.weight": {1: keep}}),
    ], refused={"stem": r"split \(in sk\) would not select the same channels"})


HAND_FAMILIES = {f.__name__: f for f in (repvgg, self_residual, selective_kernel)}
HAND_FAMILIES["repvgg_untraceable"] = lambda seed=0: repvgg(seed, traceable=False)     # the recorded front end
