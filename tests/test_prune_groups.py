"""``carfast.prune`` of coupling groups: the greedy loop equals the naive one (one full network run per
candidate channel, with the channels removed so far and the candidate zeroed on the residual stream),
in both schedules and beside plain layers; the baseline criteria, budgets, checkpoints, saving and
masks work for a group as they do for a layer."""
from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from naive import RESNET20_STREAMS, naive_greedy_by, naive_removal_logits, naive_stream_logits
from nets import FAMILIES, make_inputs
from nets.families import SHAPE
from torch import nn

import carfast
from carfast.criteria import l1_norm
from carfast.graph import find_group
from carfast.integrations.masks import to_masks
from carfast.models import cifar_resnet
from carfast.scoring.selection import DEFAULT_RULE

GROUP_TARGETS = [(name, t.layer) for name, make in FAMILIES.items() for t in make().targets if t.group]


@functools.lru_cache(maxsize=None)
def resnet20():
    return cifar_resnet(20)


@functools.lru_cache(maxsize=None)
def cifar(n: int):
    return carfast.data.cifar10_test(n)


def _same_steps(history, ref, n):
    assert [h["filter"] for h in history] == [r["filter"] for r in ref]
    assert [h["correct"] for h in history] == [r["correct"] for r in ref]
    assert [h["loss"] * n for h in history] == pytest.approx([r["loss_sum"] for r in ref], rel=1e-4)


@pytest.mark.parametrize("layer, n, steps, rule", [("conv1", 120, 4, "accuracy"), ("layer3.2.conv2", 64, 3, "accuracy"),
                                                   ("conv1", 120, 3, "loss"), ("layer3.2.conv2", 64, 3, "lcb")])
def test_group_greedy_equals_the_naive_loop_on_resnet20(layer, n, steps, rule):
    """The stage-1 group (the stem and every stage-1 block's second conv) and the stage-3 group."""
    model = resnet20()
    x, y = cifar(n)
    units = model.get_submodule(layer).out_channels
    result = carfast.prune(model, layer, (x, y), keep=units - steps, rule=rule, progress=False)
    ref = naive_greedy_by(lambda gone: naive_stream_logits(model, RESNET20_STREAMS[layer], x, gone), y, units, steps,
                          rule)
    _same_steps(result.history, ref, n)
    assert result.settings["groups"] == [layer] and len(result.kept[layer]) == units - steps
    producers = find_group(model, layer, x[:1]).producers       # the stem / every block's second conv
    assert len(producers) >= 3
    assert all(result.model.get_submodule(p).out_channels == units - steps for p in producers)
    with torch.no_grad():      # the pruned network computes what the zeroed stream computes
        assert torch.allclose(result.model(x), naive_stream_logits(model, RESNET20_STREAMS[layer], x,
                                                                   result.removed[layer]), atol=1e-4)


@pytest.mark.parametrize("name, layer", GROUP_TARGETS)
def test_group_greedy_equals_the_naive_loop_on_families(name, layer):
    """Every family of tests/nets with a group: residual streams, paired (Ghost) and gated channels."""
    fam = FAMILIES[name]()
    t = next(t for t in fam.targets if t.layer == layer)
    g = torch.Generator().manual_seed(5)
    x = make_inputs(SHAPE, 40, g)
    with torch.no_grad():
        y = fam.model(x).argmax(1)
    y[::3] = torch.randint(0, 5, (len(y[::3]),), generator=g)
    result = carfast.prune(fam.model, layer, (x, y), keep=t.units - 2, progress=False)
    ref = naive_greedy_by(lambda gone: naive_removal_logits(fam.model, t.removal, x, gone), y, t.units, 2, DEFAULT_RULE)
    _same_steps(result.history, ref, len(x))
    with torch.no_grad():
        assert torch.allclose(result.model(x), naive_removal_logits(fam.model, t.removal, x, result.removed[layer]),
                              atol=1e-4, rtol=1e-4)


def test_global_schedule_mixes_a_group_and_layers():
    """The global schedule removes the best channel of any target: each removal is the best candidate of
    the naive runs of that moment (a group's channel zeroed on the stream, a filter at its consumer),
    ties broken by the order the targets are listed in, then the index."""
    model = resnet20()
    x, y = cifar(96)
    order = ["layer1.0.conv1", "conv1"]
    result = carfast.prune(model, order, (x, y), keep=14, schedule="global", rule="accuracy", progress=False)
    assert result.settings["groups"] == ["conv1"] and [len(result.removed[n]) for n in order] == [2, 2]
    assert result.model.conv1.out_channels == 14 and result.model.layer1[0].conv1.out_channels == 14
    for i, row in enumerate(result.history):
        gone = {n: [r["filter"] for r in result.history[:i] if r["layer"] == n] for n in order}
        best = None
        for pos, layer in enumerate(order):
            for k in range(16) if len(gone[layer]) < 2 else ():
                if k in gone[layer]:
                    continue
                trial = {**gone, layer: gone[layer] + [k]}
                logits = _both(model, x, trial["conv1"], trial["layer1.0.conv1"])
                loss = float(torch.nn.functional.cross_entropy(logits.double(), y, reduction="sum"))
                key = (-int((logits.argmax(1) == y).sum()), loss, pos, k)
                best = key if best is None else min(best, key)
        assert (row["layer"], row["filter"]) == (order[best[2]], best[3]), i


def _both(model, x, stream, own):
    """Logits with ``stream`` channels zeroed on the stage-1 stream and ``own`` filters of layer1.0.conv1
    zeroed at the input of its consumer (layer1.0.conv2)."""
    handle = model.layer1[0].conv2.register_forward_pre_hook(
        lambda m, a: (a[0].index_fill(1, torch.tensor(own, dtype=torch.long), 0),) if own else None)
    try:
        return naive_stream_logits(model, RESNET20_STREAMS["conv1"], x, stream)
    finally:
        handle.remove()


def test_baseline_criteria_and_a_budget_for_a_group():
    model = resnet20()
    x, y = cifar(96)
    r = carfast.prune(model, "conv1", (x, y), keep=13, criterion="l1", progress=False)
    order = l1_norm(model, "conv1", (x, y)).argsort().tolist()      # l1 over the group's producers
    assert r.removed["conv1"] == order[:3]
    for crit in ("random", "mean_activation", "apoz", "taylor"):
        r = carfast.prune(model, "conv1", (x, y), keep=15, criterion=crit, progress=False)
        assert len(r.removed["conv1"]) == 1 and r.model.conv1.out_channels == 15, crit
    r = carfast.prune(model, ["conv1", "layer1.0.conv1"], (x, y), keep=4,
                      max_accuracy_drop={"conv1": 0.02, "layer1.0.conv1": None}, progress=False)
    assert r.stops["conv1"]["reason"] == "max_accuracy_drop" and "layer1.0.conv1" not in r.stops
    assert len(r.kept["layer1.0.conv1"]) == 4
    assert r.history[len(r.removed["conv1"]) - 1]["accuracy"] >= r.base["accuracy"] - 0.02
    assert "conv1: stopped at" in str(r.summary()) and "conv1 group channels" in str(r.summary())


def test_checkpoint_resume_save_and_masks_of_a_group(tmp_path):
    model = resnet20()
    x, y = cifar(64)
    ck = tmp_path / "run.json"
    first = carfast.prune(model, ["layer3.2.conv2", "layer3.0.conv1"], (x, y), keep=62, checkpoint=ck,
                          progress=False)
    again = carfast.prune(model, ["layer3.2.conv2", "layer3.0.conv1"], (x, y), keep=62, checkpoint=ck,
                          progress=False)
    assert again.removed == first.removed and again.history == first.history
    first.save(tmp_path / "p.pt")
    back = carfast.load_pruned(tmp_path / "p.pt")
    assert back.settings["groups"] == ["layer3.2.conv2"] and back.removed == first.removed
    with torch.no_grad():
        assert torch.equal(back.model(x), first.model(x))
    with pytest.raises(ValueError, match=r"to_masks: .*channel-map shortcut.*use carfast.remove_groups"):
        to_masks(model, first)      # stage 3 is fed by the option-A shortcut of layer3.0: no weights to mask


def test_masks_of_a_pruned_group_equal_the_pruned_model():
    fam = FAMILIES["csp"]()
    x = make_inputs(SHAPE, 24, torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = fam.model(x).argmax(1)
    result = carfast.prune(fam.model, ["blocks.1.c2", "blocks.0.c1"], (x, y), keep=2, progress=False)
    assert result.settings["groups"] == ["blocks.1.c2"]
    masked = to_masks(fam.model, result)
    with torch.no_grad():
        assert torch.allclose(masked(x), result.model(x), atol=1e-5)


def test_cutting_a_coupled_layer_alone_points_to_remove_groups():
    model = resnet20()
    with pytest.raises(ValueError, match=r"remove_filters: layer 'layer2.1.conv2' cannot be cut on its own.*"
                                         r"carfast.remove_groups\(\{'layer2.1.conv2': channels\}\)"):
        carfast.remove_filters(model, {"layer2.1.conv2": [0]})
    with pytest.raises(ValueError, match=r"score_layer: .* carfast.score_group\('conv1'\).* carfast.prune"):
        carfast.score_layer(model, "conv1", cifar(8))


# ---- a shortcut written as a function ----------------------------------------------------------------

class LambdaLayer(nn.Module):
    """The module the classic CIFAR ResNet code wraps its option-A shortcut in."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def pad_resnet20() -> nn.Module:
    """The bundled ResNet-20 with the option-A shortcuts written as that code writes them: ``F.pad`` of the
    channels in a lambda (the same function as ``models.OptionAShortcut``)."""
    model = copy.deepcopy(resnet20())
    for stage in (model.layer2, model.layer3):
        p = stage[0].conv1.out_channels // 4
        stage[0].shortcut = LambdaLayer(lambda x, p=p: F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, p, p), "constant", 0))
    return model


@pytest.mark.parametrize("schedule", ["sequential", "global"])
def test_prune_cuts_groups_across_a_functional_pad_shortcut(schedule, tmp_path):
    """Surgery rewrites the traced F.pad call into a channel map: the pruned network equals the original with
    the removed channels zeroed on their streams, chooses as the module shortcut does, and saves and loads."""
    model, x, y = pad_resnet20(), *cifar(32)
    layers, keep = ["conv1", "layer2.1.conv2"], {"conv1": 13, "layer2.1.conv2": 29}
    result = carfast.prune(model, layers, (x, y), keep=keep, schedule=schedule, progress=False)
    same = carfast.prune(resnet20(), layers, (x, y), keep=keep, schedule=schedule, progress=False)
    assert result.removed == same.removed and result.settings["groups"] == layers
    gone = torch.tensor(result.removed["layer2.1.conv2"])
    handles = [model.get_submodule(n).register_forward_hook(lambda m, a, out: out.index_fill(1, gone, 0))
               for n in RESNET20_STREAMS["layer2.1.conv2"]]          # the stage-2 stream zeroed too
    try:
        reference = naive_stream_logits(model, RESNET20_STREAMS["conv1"], x, result.removed["conv1"])
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        got = result.model(x)
    assert torch.allclose(got, reference, atol=1e-4)
    assert result.model.conv1.out_channels == 13 and result.model.layer2[2].conv2.out_channels == 29
    assert result.model.layer2[0].shortcut.pad_map.carfast_channel_map()[:2] == (13, 29)
    assert isinstance(model.layer2[0].shortcut, LambdaLayer) and not hasattr(model.layer2[0].shortcut, "pad_map")
    result.save(tmp_path / "p.pt")
    back = carfast.load_pruned(tmp_path / "p.pt", model=pad_resnet20())
    with torch.no_grad():
        assert torch.equal(back.model(x), got)
