"""The architecture families (tests/nets/families.py): scores equal the naive removal image by image, the
naive removal equals physical deletion, masks equal surgery, and refusals name the op.

The naive reference (``naive.naive_removal_scores``) removes unit k as each family's hand-written
``Removal`` says, one full run per unit; it is checked against carfast's surgery on every target here
and against hand-built smaller networks for the new semantics (a normaliser renormalising over the
channels that remain; a squeeze-and-excitation gate).
"""
from __future__ import annotations

import functools
import re

import pytest
import torch
import torch.nn.functional as F
from naive import naive_removal_logits, naive_removal_scores
from nets import FAMILIES, own_labels
from nets.families import SHAPE, ConvNeXtNet, SENet

import carfast
from carfast.integrations.masks import to_masks

TARGETS = [(name, t.layer) for name, make in FAMILIES.items() for t in make().targets]
REFUSED = [(name, layer, False) for name, make in FAMILIES.items() for layer in make().refused] + \
    [(name, layer, True) for name, make in FAMILIES.items() for layer in make().group_refused]


@functools.lru_cache(maxsize=None)
def family(name):
    return FAMILIES[name]()


def target(name, layer):
    return next(t for t in family(name).targets if t.layer == layer)


@functools.lru_cache(maxsize=None)
def data(name, n=48):
    """Seeded inputs; labels: the model's own prediction for two thirds, a random class for the rest."""
    return own_labels(family(name).model, SHAPE, n, 123, 5)


def _score(name, layer, **kw):
    t = target(name, layer)
    fn = carfast.score_group if t.group else carfast.score_layer
    return fn(family(name).model, layer, data(name), per_image=True, progress=False, **kw)


def _remove(name, layer, units):
    t = target(name, layer)
    fn = carfast.remove_groups if t.group else carfast.remove_filters
    return fn(family(name).model, {layer: units}, example=data(name)[0][:1])


@pytest.mark.parametrize("name, layer", TARGETS)
def test_scores_equal_the_naive_removal(name, layer):
    t = target(name, layer)
    x, y = data(name)
    res = _score(name, layer)
    ref = naive_removal_scores(family(name).model, t.removal, x, y, range(t.units))
    assert res.filters.numel() == t.units
    diff = res.image_correct != ref.correct
    assert not bool((diff & ~ref.near_ties()).any()), f"{int(diff.sum())} images differ"
    assert torch.equal(res.base_image_correct, ref.base_correct)
    assert torch.allclose(res.loss_sum, ref.loss.sum(1), rtol=1e-4)
    assert res.coupled == (t.group and res.coupled)        # score_layer never reports a group


@pytest.mark.parametrize("name, layer", TARGETS)
def test_naive_removal_equals_physical_deletion(name, layer):
    """Surgery of one unit (the first and the last) computes what the naive removal computes."""
    t = target(name, layer)
    x, _ = data(name)
    for k in (0, t.units - 1):
        pruned = _remove(name, layer, [k])
        with torch.no_grad():
            got = pruned(x)
        ref = naive_removal_logits(family(name).model, t.removal, x, k)
        assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4), (k, float((got - ref).abs().max()))


@pytest.mark.parametrize("name, layer", TARGETS)
def test_masks_equal_surgery_or_say_why_not(name, layer):
    t = target(name, layer)
    x, _ = data(name)
    units = [0, t.units - 1]
    model = family(name).model
    if not t.maskable:
        with pytest.raises(ValueError, match="weight masks cannot express"):
            to_masks(model, {layer: units}, example=x[:1])
        return
    masked = to_masks(model, {layer: units}, example=x[:1])
    with torch.no_grad():
        assert torch.allclose(masked(x), _remove(name, layer, units)(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name, layer, group", REFUSED)
def test_refusals_name_the_op(name, layer, group):
    f = family(name)
    fn, regex = (carfast.score_group, f.group_refused[layer]) if group else (carfast.score_layer, f.refused[layer])
    with pytest.raises(ValueError, match=regex):
        fn(f.model, layer, data(name), progress=False)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_layers_listing_agrees(name):
    """``carfast.graph.layers`` says "layer" / "group" for every target as scored here, "refused" naming why."""
    infos = {i.name: i for i in carfast.layers(family(name).model, example=data(name)[0][:1])}
    for t in family(name).targets:
        assert infos[t.layer].status == ("group" if t.group else "layer"), t.layer
        assert infos[t.layer].units == t.units
    for layer, regex in family(name).group_refused.items():
        assert infos[layer].status == "refused", layer
        assert re.search(regex, infos[layer].reason), (layer, infos[layer].reason)


def test_low_precision_and_batches_change_nothing():
    """A masked suffix (squeeze-and-excitation: the project conv reads the gated channel) in bf16 with the
    float32 re-run, and in small chunks, gives float32's per-image results."""
    ref = _score("se", "conv")
    low = _score("se", "conv", precision="bf16")
    small = _score("se", "conv", memory_budget=1 << 18, batch_size=7)
    assert torch.equal(low.image_correct, ref.image_correct) and torch.equal(small.image_correct, ref.image_correct)


# ---- the naive removal against networks built smaller by hand ----------------------------------------------

def _copy_sliced(src, dst, keep: dict):
    """Copy every tensor of ``src`` into ``dst``, slicing dims listed in ``keep[name] = {dim: indices}``."""
    with torch.no_grad():
        for name, t in src.state_dict().items():
            for dim, idx in keep.get(name, {}).items():
                t = t.index_select(dim, torch.tensor(idx))
            dst.state_dict()[name].copy_(t)
    return dst.eval()


def test_normaliser_removal_is_a_smaller_convnext():
    """Removing stream channel k of the ConvNeXt family = the same network with 7 channels: the LayerNorms
    normalise over the 7 that remain (not a zero-filled 8th)."""
    f = FAMILIES["convnext"]()
    x, k = data("convnext")[0], 3
    keep = [i for i in range(8) if i != k]
    small = ConvNeXtNet()
    small.stem, small.stem_norm = torch.nn.Conv2d(3, 7, 2, stride=2), type(small.stem_norm)(7)
    small.block.dw = torch.nn.Conv2d(7, 7, 7, padding=3, groups=7)
    small.block.norm, small.block.pw1 = torch.nn.LayerNorm(7), torch.nn.Linear(7, 16)
    small.block.pw2, small.block.gamma = torch.nn.Linear(16, 7), torch.nn.Parameter(torch.ones(7))
    small.head_norm, small.fc = torch.nn.LayerNorm(7), torch.nn.Linear(7, 5)
    rows = {0: keep}
    spec = {"stem.weight": rows, "stem.bias": rows, "stem_norm.weight": rows, "stem_norm.bias": rows,
            "block.dw.weight": rows, "block.dw.bias": rows, "block.norm.weight": rows, "block.norm.bias": rows,
            "block.pw1.weight": {1: keep}, "block.pw2.weight": rows, "block.pw2.bias": rows, "block.gamma": rows,
            "head_norm.weight": rows, "head_norm.bias": rows, "fc.weight": {1: keep}}
    _copy_sliced(f.model, small, spec)
    stream = next(t for t in f.targets if t.layer == "stem").removal
    with torch.no_grad():
        assert torch.allclose(small(x), naive_removal_logits(f.model, stream, x, k), atol=1e-5)
        zero_filled = f.model.stem.weight.clone()
        f.model.stem.weight[k] = 0
        f.model.stem.bias[k] = 0
        differs = not torch.allclose(f.model(x), small(x), atol=1e-3)
        f.model.stem.weight.copy_(zero_filled)
    assert differs                         # zeroing the channel is not removing it


def test_gate_removal_is_a_smaller_squeeze_and_excitation():
    """Removing channel k of the SE family's conv = the same network with 7 channels, the gate's expand
    conv losing its output k."""
    f = FAMILIES["se"]()
    x, k = data("se")[0], 5
    keep = [i for i in range(8) if i != k]
    small = SENet()
    small.conv, small.bn = torch.nn.Conv2d(3, 7, 3, padding=1), torch.nn.BatchNorm2d(7)
    small.reduce, small.expand = torch.nn.Conv2d(7, 4, 1), torch.nn.Conv2d(4, 7, 1)
    small.project_w = torch.nn.Parameter(torch.zeros(6, 7, 3, 3))
    rows = {0: keep}
    spec = {"conv.weight": rows, "conv.bias": rows, "bn.weight": rows, "bn.bias": rows, "bn.running_mean": rows,
            "bn.running_var": rows, "reduce.weight": {1: keep}, "expand.weight": rows, "expand.bias": rows,
            "project_w": {1: keep}}
    _copy_sliced(f.model, small, spec)
    removal = next(t for t in f.targets if t.layer == "conv").removal
    with torch.no_grad():
        assert torch.allclose(small(x), naive_removal_logits(f.model, removal, x, k), atol=1e-5)
    assert F.relu(torch.ones(1)).item() == 1.0


def test_a_pruned_convnext_saves_and_loads(tmp_path):
    """LayerNorm sizes, per-channel norms' entries and a layer scale come back at their pruned shapes."""
    from carfast.surgery.pruned_io import load_pruned_model, save_pruned
    f = FAMILIES["convnext"]()
    x = data("convnext")[0]
    pruned = carfast.remove_groups(f.model, {"stem": [1, 6]}, example=x[:1])
    save_pruned(pruned, tmp_path / "p.pt")
    again, _ = load_pruned_model(tmp_path / "p.pt", model=FAMILIES["convnext"]().model)
    assert again.block.norm.normalized_shape == (6,) and again.block.gamma.shape == (6,)
    with torch.no_grad():
        assert torch.equal(again(x), pruned(x))
