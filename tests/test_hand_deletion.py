"""Scores, greedy pruning, surgery and masks against networks made smaller by hand (tests/nets/deletion.py).

The families are the two where a score once differed from deleting the channel in the model zoo:
- RepVGG blocks (a 3x3 branch, a 1x1 branch and an identity BatchNorm summed), and their barest form,
  a layer added to its own input (h + conv(h), z + linear(z), h + dwconv(h)): a layer that reads the
  channels of its own coupling group. The channel-flow analysis never counted the target among its
  group's readers, so removing a channel left it visible to the target itself (timm's repvgg_a0 scored
  5.8e-4 away from the deletion in float64; carfast's surgery of it did not run).
- a selective-kernel convolution (paths stacked, an attention over the paths for each channel,
  softmaxed across the paths). carfast was right here: the deletion it was compared with,
  Torch-Pruning's, drops the attention rows 2c and 2c + 1 where the attention's ``view(b, paths, C, 1, 1)``
  makes path p's weight for channel c row p * C + c. These tests pin carfast's answer to the network
  built by hand.
"""
from __future__ import annotations

import functools
import re

import pytest
import torch
import torch.nn.functional as F
from naive import margin_of, naive_greedy_by, near_tie
from nets import own_labels
from nets.deletion import HAND_FAMILIES, SHAPE, C

import carfast
from carfast.integrations.masks import to_masks
from carfast.scoring.selection import DEFAULT_RULE

TARGETS = [(name, t.layer) for name, make in HAND_FAMILIES.items() for t in make().targets]
REFUSED = [(name, layer) for name, make in HAND_FAMILIES.items() for layer in make().refused]


@functools.lru_cache(maxsize=None)
def family(name):
    return HAND_FAMILIES[name]()


def target(name, layer):
    return next(t for t in family(name).targets if t.layer == layer)


@functools.lru_cache(maxsize=None)
def data(name, n=48):
    """Seeded inputs; labels: the model's own prediction for two thirds, a random class for the rest."""
    return own_labels(family(name).model, SHAPE, n, 321, C)


def hand_logits(name, layer, units) -> torch.Tensor:
    """[N, C] logits of the network with ``units`` of ``layer`` deleted, built by hand."""
    with torch.no_grad():
        return target(name, layer).deleted(family(name).model, units)(data(name)[0])


@pytest.mark.parametrize("name, layer", TARGETS)
def test_scores_equal_the_hand_built_deletion(name, layer):
    t = target(name, layer)
    x, y = data(name)
    score = carfast.score_group if t.group else carfast.score_layer
    res = score(family(name).model, layer, (x, y), per_image=True, progress=False)
    assert res.filters.tolist() == list(range(t.units))
    with torch.no_grad():
        assert torch.equal(res.base_image_correct, family(name).model(x).argmax(1) == y)
    for k in range(t.units):
        logits = hand_logits(name, layer, [k])
        differ = (res.image_correct[k] != (logits.argmax(1) == y)) & ~near_tie(margin_of(logits), logits)
        assert not bool(differ.any()), f"unit {k}: {int(differ.sum())} images differ"
        loss = float(F.cross_entropy(logits.double(), y, reduction="sum"))
        assert float(res.loss_sum[k]) == pytest.approx(loss, rel=1e-5), k


@pytest.mark.parametrize("name, layer", TARGETS)
def test_surgery_is_the_network_built_by_hand(name, layer):
    """Deleting units: every tensor of the pruned network equals the hand-built one's, entry for entry."""
    t = target(name, layer)
    x = data(name)[0]
    remove = carfast.remove_groups if t.group else carfast.remove_filters
    for units in ([0], [1, t.units - 1]):
        pruned = remove(family(name).model, {layer: units}, example=x[:1])
        hand = t.deleted(family(name).model, units)
        got, want = pruned.state_dict(), hand.state_dict()
        assert list(got) == list(want)
        for key in want:
            assert torch.equal(got[key], want[key]), (units, key)
        with torch.no_grad():
            assert torch.allclose(pruned(x), hand(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name, layer", TARGETS)
def test_masks_compute_the_network_built_by_hand(name, layer):
    """torch.nn.utils.prune masks of the same units: the masked full-size network computes the hand-built one."""
    t = target(name, layer)
    x = data(name)[0]
    units = [1, t.units - 1]
    masked = to_masks(family(name).model, {layer: units}, example=x[:1])
    with torch.no_grad():
        assert torch.allclose(masked(x), t.deleted(family(name).model, units)(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name, layer", TARGETS)
def test_greedy_pruning_equals_the_hand_built_loop(name, layer):
    """carfast.prune's removals, and its accuracy and loss after each, are the naive greedy loop's on
    networks built by hand (every candidate of every step a smaller network of its own)."""
    t = target(name, layer)
    x, y = data(name)
    steps = 3
    result = carfast.prune(family(name).model, layer, (x, y), keep=t.units - steps, progress=False)
    ref = naive_greedy_by(lambda gone: hand_logits(name, layer, gone), y, t.units, steps, DEFAULT_RULE)
    assert [h["filter"] for h in result.history] == [r["filter"] for r in ref]
    assert [h["correct"] for h in result.history] == [r["correct"] for r in ref]
    assert [h["loss"] * len(y) for h in result.history] == pytest.approx([r["loss_sum"] for r in ref], rel=1e-5)
    with torch.no_grad():
        assert torch.allclose(result.model(x), hand_logits(name, layer, result.removed[layer]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name, layer", REFUSED)
def test_refusals_name_the_reason(name, layer):
    """The selective kernel's input is split by a size fixed at construction: no network has one of its
    input channels deleted alone, so scoring it is refused, as a layer and as a group."""
    regex = family(name).refused[layer]
    for fn in (carfast.score_layer, carfast.score_group):
        with pytest.raises(ValueError, match=regex):
            fn(family(name).model, layer, data(name), progress=False)


@pytest.mark.parametrize("name", list(HAND_FAMILIES))
def test_layers_listing_agrees(name):
    infos = {i.name: i for i in carfast.layers(family(name).model, example=data(name)[0][:1])}
    for t in family(name).targets:
        assert infos[t.layer].status == ("group" if t.group else "layer"), t.layer
        assert infos[t.layer].units == t.units
    for layer, regex in family(name).refused.items():
        assert infos[layer].status == "refused" and re.search(regex, infos[layer].reason), infos[layer]


def test_a_target_reading_its_own_group_is_its_reader():
    """The rule behind the RepVGG mismatch: a layer that reads and writes one stream is both a producer
    and a reader of its group, so the group's members list its input (surgery cuts it)."""
    from carfast.graph import find_group
    fam = family("repvgg")
    group = find_group(fam.model, "b1.conv_1x1", data("repvgg")[0][:1])
    roles = {(m.layer, m.role) for m in group.members}
    for layer in ("b1.conv_1x1", "b1.conv_kxk", "b2.conv_1x1", "b2.conv_kxk"):
        assert (layer, "output") in roles and (layer, "input") in roles, layer
    assert ("b0.conv_1x1", "input") not in roles and ("b1.identity", "batchnorm") in roles
