"""A module type of the user's own, registered with ``carfast.register_module``: analysed as one call by its
handler, through the whole pipeline (layers, scoring against the naive re-run, prune in both schedules,
surgery, masks, saving and loading)."""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from naive import naive_greedy_by, naive_logits, naive_scores
from nets.basic import own_labels, randomize
from torch import nn

import carfast
from carfast.graph.rule import Rule
from carfast.integrations.masks import from_masks, to_masks
from carfast.surgery import count_macs, cut_tensor


class WidthGate(nn.Module):
    """Gates each position by the running sum along the width: ``cumsum``, which carfast does not know,
    mixes positions along the last axis only, so channels stay separate."""

    def forward(self, x):                   # [N, C, H, W] -> [N, C, H, W]
        return x * torch.sigmoid(x.cumsum(-1) / x.shape[-1])


class WidthGateHandler(carfast.ModuleHandler):
    def rule(self, module, op, rank):
        return Rule("reduce", axes=(rank - 1,))


class GatedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.gate = WidthGate()
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):                   # [N, 3, 8, 8] -> [N, 4]
        x = self.gate(F.relu(self.bn1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.conv2(x)), 1).flatten(1))


@contextlib.contextmanager
def _registered(module_type, handler):
    carfast.register_module(module_type, handler)
    try:
        yield
    finally:
        carfast.unregister_module(module_type)


@pytest.fixture
def registered():
    with _registered(WidthGate, WidthGateHandler()):
        yield


def _net_and_data(net=GatedNet, seed=0):
    model = randomize(net(), seed=seed)
    x, y = own_labels(model, (3, 8, 8), 80, seed=seed, num_classes=4)
    return model, x, y


def test_unregistered_type_is_refused_and_names_register_module():
    model, x, y = _net_and_data()
    info = {i.name: i for i in carfast.layers(model)}
    assert info["conv1"].status == "refused" and "cumsum" in info["conv1"].reason
    with pytest.raises(ValueError, match="cumsum"):
        carfast.score_layer(model, "conv1", (x, y), progress=False)


def test_registered_type_scores_prunes_cuts_masks_and_reloads(registered, tmp_path):
    model, x, y = _net_and_data()
    info = {i.name: i for i in carfast.layers(model)}
    assert info["conv1"].status == "layer"
    res = carfast.score_layer(model, "conv1", (x, y), per_image=True, progress=False)
    ref = naive_scores(model, {"conv2": 1}, x, y, range(6))
    diff = res.image_correct != ref.correct
    assert not bool((diff & ~ref.near_ties()).any())
    assert torch.allclose(res.loss_sum, ref.loss.sum(1), rtol=1e-5)
    for schedule in ("sequential", "global"):
        result = carfast.prune(model, ["conv1"], (x, y), keep=3, rule="loss", schedule=schedule, progress=False)
        steps = naive_greedy_by(lambda gone: naive_logits(model, {"conv2": 1}, x, None, removed=gone), y, 6, 3,
                                rule="loss")
        assert [r["filter"] for r in result.history] == [s["filter"] for s in steps], schedule
        with torch.no_grad():
            expected = naive_logits(model, {"conv2": 1}, x, None, removed=result.removed["conv1"])
            assert torch.allclose(result.model(x), expected, atol=1e-5)
            assert torch.allclose(to_masks(model, result)(x), expected, atol=1e-5)
        assert result.model.conv1.out_channels == 3 and isinstance(result.model.gate, WidthGate)
    result.save(tmp_path / "p.pt")
    back = carfast.load_pruned(tmp_path / "p.pt", model=GatedNet().eval())
    with torch.no_grad():
        assert torch.equal(back.model(x), result.model(x))


def test_register_module_refuses_bad_input():
    with pytest.raises(TypeError, match="nn.Module subclass"):
        carfast.register_module(int, WidthGateHandler())
    with pytest.raises(TypeError, match="ModuleHandler"):
        carfast.register_module(WidthGate, lambda m, op, rank: Rule("elementwise"))
    with pytest.raises(ValueError, match="already handles Conv2d"):
        carfast.register_module(nn.Conv2d, WidthGateHandler())
    with pytest.raises(ValueError, match="was not registered"):
        carfast.unregister_module(WidthGate)


# ---- a layer of the user's own: a conv, its BatchNorm and a ReLU as one module with its own tensors ----------
class ConvBNAct(nn.Module):
    """Conv (3x3, padding 1, no bias) -> BatchNorm -> ReLU in one module, holding the tensors a fused kernel
    would: weight [out, in, 3, 3], the norm's scale / shift [out] and running statistics [out]."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, 3, 3) / (3 * in_channels ** 0.5))
        self.scale = nn.Parameter(torch.ones(out_channels))
        self.shift = nn.Parameter(torch.zeros(out_channels))
        self.register_buffer("running_mean", torch.zeros(out_channels))
        self.register_buffer("running_var", torch.ones(out_channels))

    def forward(self, x):                   # [N, in, H, W] -> [N, out, H, W]
        y = F.conv2d(x, self.weight, padding=1)
        y = F.batch_norm(y, self.running_mean, self.running_var, self.scale, self.shift, self.training, 0.1, 1e-5)
        return F.relu(y)


_PER_FILTER = ("scale", "shift", "running_mean", "running_var")


class ConvBNActHandler(carfast.ModuleHandler):
    def rule(self, module, op, rank):
        return Rule("mix", weight=module)          # reads every input channel, makes new ones (not linearly)

    def filters(self, module):
        return module.out_channels

    def slice(self, module, ins, outs, params):
        module.in_channels = cut_tensor(module, "weight", 1, ins)
        module.out_channels = cut_tensor(module, "weight", 0, outs)
        for attr in _PER_FILTER:
            cut_tensor(module, attr, 0, outs)

    def masks(self, module, ins, outs):
        weight = torch.ones_like(module.weight)
        weight[outs] = 0
        weight[:, ins] = 0
        per_filter = torch.ones_like(module.scale)
        per_filter[outs] = 0                # scale and shift zero: the filter's output is relu(0) = 0
        return {"weight": weight, "scale": per_filter, "shift": per_filter.clone()}

    def sizes(self, module):
        return {"in_channels": module.in_channels, "out_channels": module.out_channels}

    def macs(self, module, inputs, output):
        return output.numel() * module.in_channels * 9


class FusedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.block1 = ConvBNAct(3, 6)
        self.block2 = ConvBNAct(6, 8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):                   # [N, 3, 8, 8] -> [N, 4]
        x = self.block2(F.max_pool2d(self.block1(x), 2))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


@pytest.fixture
def fused_registered():
    with _registered(ConvBNAct, ConvBNActHandler()):
        yield


@pytest.mark.parametrize("layer, consumer, width", [("block1", "block2", 1), ("block2", "fc", 1)])
def test_registered_layer_type_scores_prunes_cuts_masks_and_reloads(fused_registered, tmp_path, layer, consumer,
                                                                     width):
    model, x, y = _net_and_data(FusedNet, seed=1)
    info = {i.name: i for i in carfast.layers(model)}
    assert [i.status for i in info.values()] == ["layer", "layer", "refused"] and info[layer].filters == \
        model.get_submodule(layer).out_channels
    n = info[layer].filters
    res = carfast.score_layer(model, layer, (x, y), per_image=True, progress=False)
    ref = naive_scores(model, {consumer: width}, x, y, range(n))
    assert not bool(((res.image_correct != ref.correct) & ~ref.near_ties()).any())
    assert torch.allclose(res.loss_sum, ref.loss.sum(1), rtol=1e-5)
    keep = n // 2
    for schedule in ("sequential", "global"):
        result = carfast.prune(model, [layer], (x, y), keep=keep, rule="loss", schedule=schedule, progress=False)
        steps = naive_greedy_by(lambda gone: naive_logits(model, {consumer: width}, x, None, removed=gone), y, n,
                                n - keep, rule="loss")
        assert [r["filter"] for r in result.history] == [s["filter"] for s in steps], schedule
        with torch.no_grad():
            expected = naive_logits(model, {consumer: width}, x, None, removed=result.removed[layer])
            assert torch.allclose(result.model(x), expected, atol=1e-5)
            masked = to_masks(model, result)
            assert torch.allclose(masked(x), expected, atol=1e-5)
        assert from_masks(masked) == {layer: sorted(result.removed[layer])}
        pruned = result.model.get_submodule(layer)
        assert pruned.out_channels == keep and pruned.weight.shape[0] == keep and pruned.running_var.shape == (keep,)
        assert model.get_submodule(layer).out_channels == n                    # the user's model is untouched
    ex = x[:1]
    before, after = count_macs(model, ex), count_macs(result.model, ex)
    assert before == 64 * 6 * 3 * 9 + 16 * 8 * 6 * 9 + 4 * 8 and after < before
    result.save(tmp_path / "p.pt")
    back = carfast.load_pruned(tmp_path / "p.pt", model=FusedNet().eval())
    assert back.model.get_submodule(layer).out_channels == keep
    with torch.no_grad():
        assert torch.equal(back.model(x), result.model(x))


def test_registered_type_without_slice_is_refused_by_surgery(tmp_path):
    class RuleOnly(carfast.ModuleHandler):
        def rule(self, module, op, rank):
            return Rule("mix", weight=module)

        def filters(self, module):
            return module.out_channels

    with _registered(ConvBNAct, RuleOnly()):
        model, x, y = _net_and_data(FusedNet, seed=1)
        with pytest.raises(ValueError, match="cannot resize.*defines slice"):
            carfast.remove_filters(model, {"block1": [0]})
        with pytest.raises(ValueError, match="no weight masks"):
            to_masks(model, {"block1": [0]})
