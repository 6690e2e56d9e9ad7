"""One target: a layer or ``carfast.Group(layer)`` through ``score_layer``, ``LayerScorer``, ``remove_filters``
and ``prune``, equal to the group forms (``score_group``, ``GroupScorer``, ``remove_groups``), which
``test_groups.py`` checks against the naive stream zeroing."""
from __future__ import annotations

import functools

import pytest
import torch
from naive import RESNET20_STREAMS, naive_stream_scores

import carfast
from carfast.models import cifar_resnet

N = 96
GROUP = "layer2.1.conv2"


@functools.lru_cache(maxsize=None)
def resnet20():
    torch.manual_seed(0)
    return cifar_resnet(20).eval()


@functools.lru_cache(maxsize=None)
def data():
    return carfast.data.cifar10_test(N)


def test_group_target_scores_as_score_group_and_the_naive_run():
    model, (x, y) = resnet20(), data()
    res = carfast.score_layer(model, carfast.Group(GROUP), (x, y), per_image=True, progress=False)
    ref = carfast.score_group(model, GROUP, (x, y), per_image=True, progress=False)
    for key in ("filters", "correct", "loss_sum", "image_correct", "base_image_correct"):
        assert torch.equal(getattr(res, key), getattr(ref, key)), key
    assert res.coupled and res.members == ref.members and len(res.members) > 2
    naive = naive_stream_scores(model, RESNET20_STREAMS[GROUP], x, y, [0, 7])
    differ = res.image_correct[[0, 7]] != naive.correct
    assert not bool((differ & ~naive.near_ties()).any())


def test_group_target_module_form_and_layer_form():
    """``Group(module)`` is the same target as ``Group(name)``; a layer target keeps ``members`` None."""
    model, (x, y) = resnet20(), data()
    by_module = carfast.score_layer(model, carfast.Group(model.get_submodule(GROUP)), (x, y), filters=[1, 2],
                                    progress=False)
    by_name = carfast.score_layer(model, carfast.Group(GROUP), (x, y), filters=[1, 2], progress=False)
    assert torch.equal(by_module.correct, by_name.correct)
    layer = carfast.LayerScorer(model, "layer2.1.conv1", (x, y), progress=False)
    assert layer.members is None and not layer.as_group
    assert not layer.score(filters=[0]).coupled


def test_group_target_scorer_removes_as_group_scorer():
    model, (x, y) = resnet20(), data()
    a = carfast.LayerScorer(model, carfast.Group(GROUP), (x, y), progress=False)
    b = carfast.GroupScorer(model, GROUP, (x, y), progress=False)
    assert a.as_group and a.num_filters == b.num_filters == 32 and a.members == b.members
    for s in (a, b):
        s.score()
        s.remove(5)
    ra, rb = a.score(), b.score()
    assert ra.filters.tolist() == rb.filters.tolist() and 5 not in ra.filters.tolist()
    assert torch.equal(ra.correct, rb.correct) and torch.equal(ra.loss_sum, rb.loss_sum)
    with pytest.warns(DeprecationWarning, match="num_filters"):
        assert b.num_channels == 32


def test_remove_filters_takes_groups_and_layers_in_one_call():
    """A group's channels and its reader's own filters in one call equal the two calls one after another."""
    model, (x, _) = resnet20(), data()
    stage1, reader = "layer1.2.conv2", "layer2.0.conv1"
    both = carfast.remove_filters(model, {carfast.Group(stage1): [0, 5], reader: [1, 2]})
    ref = carfast.remove_filters(carfast.remove_groups(model, {stage1: [0, 5]}), {reader: [1, 2]})
    assert both.get_submodule(reader).weight.shape == (30, 14, 3, 3)
    assert {k: v.shape for k, v in both.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    with torch.no_grad():
        assert torch.allclose(both.eval()(x[:16]), ref.eval()(x[:16]), atol=1e-5)
    assert model.get_submodule(reader).weight.shape == (32, 16, 3, 3)        # the model passed in is unchanged


def test_prune_takes_a_group_target():
    """``prune`` on ``Group(layer)`` makes the removals of ``prune`` on the coupled layer's name."""
    model, (x, y) = resnet20(), data()
    a = carfast.prune(model, [carfast.Group("layer1.0.conv2")], (x, y), keep=14, progress=False)
    b = carfast.prune(model, ["layer1.0.conv2"], (x, y), keep=14, progress=False)
    assert a.removed == b.removed and len(a.removed["layer1.0.conv2"]) == 2
    assert a.history[-1]["accuracy"] == b.history[-1]["accuracy"]


@pytest.mark.parametrize("call, error, match", [
    (lambda m, d: carfast.Group(3), TypeError, "Group: layer must be a module name"),
    (lambda m, d: carfast.score_layer(m, carfast.Group("nope"), d), ValueError, "layer 'nope' not found"),
    (lambda m, d: carfast.score_layer(m, carfast.Group("bn1"), d), TypeError, "is a BatchNorm2d"),
    (lambda m, d: carfast.remove_filters(m, {carfast.Group(GROUP): [-1]}), ValueError, r"valid: >= 0"),
    (lambda m, d: carfast.remove_filters(m, {carfast.Group(GROUP): [32]}), ValueError,
     "channel 32 is out of range: the group"),
    (lambda m, d: carfast.remove_filters(m, {carfast.Group(GROUP): [1], GROUP: [2]}), ValueError, "given twice"),
    (lambda m, d: carfast.remove_filters(m, {carfast.Group(GROUP): [1], carfast.Group("layer2.0.conv2"): [2]}),
     ValueError, "are in one coupling group"),
])
def test_bad_group_targets_are_named(call, error, match):
    model = resnet20()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        call(model, data())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())

