"""A module type of the user's own, registered with ``carfast.register_module``: analysed as one call by its
handler, through the whole pipeline (layers, scoring against the naive re-run, prune in both schedules,
surgery, masks, saving and loading)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from naive import naive_greedy_by, naive_logits, naive_scores
from nets.basic import own_labels, randomize
from torch import nn

import carfast
from carfast.graph.rule import Rule
from carfast.integrations.masks import to_masks


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


@pytest.fixture
def registered():
    carfast.register_module(WidthGate, WidthGateHandler())
    yield
    carfast.unregister_module(WidthGate)


def _net_and_data():
    model = randomize(GatedNet(), seed=0)
    x, y = own_labels(model, (3, 8, 8), 80, seed=0, num_classes=4)
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
