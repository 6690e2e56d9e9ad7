"""``carfast.adapt``: models whose forward takes or returns something else than one tensor / logits."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from naive import naive_scores
from torch import nn

import carfast
from carfast.adapter import is_adapted


class DictNet(nn.Module):
    """Takes {"image": x, "gain": float}, returns {"logits": ...}; the same arithmetic as PlainNet."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1)
        self.conv3 = nn.Conv2d(12, 12, 3, padding=1)
        self.head = nn.Linear(12, 5)

    def body(self, x, gain):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x)) * gain
        return self.head(torch.relu(self.conv3(x)).mean((2, 3)))

    def forward(self, inputs):
        return {"logits": self.body(inputs["image"], inputs["gain"])}


class PlainNet(DictNet):
    def forward(self, x):
        return self.body(x, 2.0)


@dataclass
class Output:
    logits: torch.Tensor


class TwoInputNet(DictNet):
    """Keyword inputs (an image and a per-image weight map), an output object: a Hugging Face-like face."""

    def forward(self, pixel_values, weight):
        return Output(self.body(pixel_values, 1.0 + weight))


def _data(n=96):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 3, 8, 8, generator=g)
    return x, torch.randint(0, 5, (n,), generator=g)


def _nets():
    torch.manual_seed(0)
    dict_net = DictNet().eval()
    plain = PlainNet().eval()
    plain.load_state_dict(dict_net.state_dict())
    return dict_net, plain


@pytest.mark.parametrize("layer, consumer", [("conv1", "conv2"), ("conv2", "conv3"), ("conv3", "head")])
def test_an_adapted_model_scores_as_its_plain_twin_and_the_naive_reference(layer, consumer):
    dict_net, plain = _nets()
    net = carfast.adapt(dict_net, lambda m, x: m({"image": x, "gain": 2.0})["logits"])
    x, y = _data()
    got = carfast.score_layer(net, layer, (x, y), per_image=True, progress=False)
    twin = carfast.score_layer(plain, layer, (x, y), per_image=True, progress=False)
    assert got.method == twin.method
    assert torch.equal(got.image_correct, twin.image_correct) and torch.equal(got.correct, twin.correct)
    ref = naive_scores(net, {consumer: 1}, x, y, range(len(got.filters)))
    assert torch.equal(got.image_correct, ref.correct)
    assert torch.allclose(got.loss_sum, ref.loss.sum(1), rtol=1e-5)


def test_several_inputs_travel_packed_in_one_tensor():
    torch.manual_seed(0)
    two = TwoInputNet().eval()
    x, y = _data()
    weight = torch.rand(x.shape[0], 1, 8, 8)
    net = carfast.adapt(two, lambda m, xw: m(pixel_values=xw[:, :3], weight=xw[:, 3:]).logits)
    packed = torch.cat([x, weight], 1)
    got = carfast.score_layer(net, "conv2", (packed, y), per_image=True, progress=False)
    ref = naive_scores(net, {"conv3": 1}, packed, y, range(12))
    assert torch.equal(got.image_correct, ref.correct)
    with torch.no_grad():
        assert torch.equal(net(packed), two(pixel_values=x, weight=weight).logits)


def test_prune_an_adapted_model_and_get_the_users_class_back():
    dict_net, _ = _nets()
    before = {k: v.clone() for k, v in dict_net.state_dict().items()}
    net = carfast.adapt(dict_net, lambda m, x: m({"image": x, "gain": 2.0})["logits"])
    x, y = _data()
    res = carfast.prune(net, ["conv1", "conv2"], (x, y), keep=0.5, progress=False)
    assert is_adapted(res.model) and res.model.conv1.out_channels == 4 and res.model.conv2.out_channels == 6
    mine = carfast.unadapt(res.model)
    assert type(mine) is DictNet and not is_adapted(mine)
    with torch.no_grad():
        assert torch.equal(mine({"image": x, "gain": 2.0})["logits"], res.model(x))
    assert carfast.evaluate(res.model, (x, y)).accuracy == res.accuracy
    # the user's model is untouched: class, weights, modules
    assert type(dict_net) is DictNet and dict_net.conv1.out_channels == 8
    assert all(torch.equal(v, dict_net.state_dict()[k]) for k, v in before.items())
    assert carfast.unadapt(dict_net) is dict_net


def test_an_adapted_result_saves_and_loads(tmp_path):
    dict_net, _ = _nets()
    net = carfast.adapt(dict_net, lambda m, x: m({"image": x, "gain": 2.0})["logits"])
    x, y = _data()
    res = carfast.prune(net, ["conv2"], (x, y), keep=6, progress=False)
    res.save(tmp_path / "r.pt")
    loaded = carfast.load_pruned(tmp_path / "r.pt", model=net)
    assert is_adapted(loaded.model) and loaded.model.conv2.out_channels == 6
    with torch.no_grad():
        assert torch.equal(loaded.model(x), res.model(x))


def test_adapting_twice_replaces_the_forward_and_setting_a_child_stays_on_the_copy():
    dict_net, _ = _nets()
    once = carfast.adapt(dict_net, lambda m, x: m({"image": x, "gain": 1.0})["logits"])
    twice = carfast.adapt(once, lambda m, x: m({"image": x, "gain": 2.0})["logits"])
    assert type(twice).__mro__[1] is DictNet
    x, _ = _data(4)
    with torch.no_grad():
        assert torch.equal(twice(x), dict_net({"image": x, "gain": 2.0})["logits"])
    twice.head = nn.Linear(12, 5)
    assert dict_net.head is not twice.head and once.head is not twice.head


def test_an_unadapted_dict_model_gets_an_error_naming_adapt():
    dict_net, _ = _nets()
    x, y = _data(8)
    with pytest.raises(ValueError, match=r"carfast.adapt\(model, lambda m, x"):
        carfast.score_layer(dict_net, "conv1", (x, y), progress=False)
    with pytest.raises(TypeError, match="forward must be a callable"):
        carfast.adapt(dict_net, "logits")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        carfast.adapt(lambda x: x, lambda m, x: m(x))


def test_a_hook_on_the_adapted_copy_is_not_on_the_model():
    dict_net, _ = _nets()
    net = carfast.adapt(dict_net, lambda m, x: m({"image": x, "gain": 2.0})["logits"])
    seen = []
    net.register_forward_hook(lambda mod, args, out: seen.append(1))
    with torch.no_grad():
        dict_net({"image": torch.zeros(1, 3, 8, 8), "gain": 2.0})
        assert not seen
        net(torch.zeros(1, 3, 8, 8))
    assert seen == [1]
