"""carfast.integrations.torch_pruning: CAR as a Torch-Pruning importance, and the option-A shortcut pruner."""
from __future__ import annotations

import copy
import importlib
import sys

import pytest
import torch
import torch.nn.functional as F
from nets import prune_step

import carfast
from carfast.graph import find_group
from carfast.models import cifar_resnet

tp = pytest.importorskip("torch_pruning", reason="Torch-Pruning is not installed (pip install '.[test]')")
from carfast.integrations.torch_pruning import CARImportance, car_importance, channel_map_pruners  # noqa: E402

EXAMPLE = torch.zeros(1, 3, 32, 32)


def _data(n=48):
    return carfast.data.cifar10_test(n)


def _graph(model, custom=True, example=EXAMPLE):
    return tp.DependencyGraph().build_dependency(model, example_inputs=example,
                                                 customized_pruners=channel_map_pruners(model) if custom else None)


def _producers(DG, group):
    return sorted(DG._module2name[d.target.module] for d, _ in group
                  if DG.is_out_channel_pruning_fn(d.handler) and isinstance(d.target.module, torch.nn.Conv2d))


def test_torch_pruning_groups_are_carfast_groups():
    """With channel_map_pruners, Torch-Pruning's groups are carfast's: one per stage, plus each block's conv1."""
    model = cifar_resnet(20)
    DG = _graph(model)
    groups = list(DG.get_all_groups(root_module_types=[torch.nn.Conv2d], ignored_layers=[model.linear]))
    assert len(groups) == 12
    for g in groups:
        root = DG._module2name[g[0].dep.target.module]
        assert _producers(DG, g) == sorted(find_group(model, root, EXAMPLE).producers), root


def test_single_importance_is_car_with_loss_tie_break():
    model = cifar_resnet(20)
    x, y = _data()
    DG = _graph(model)
    imp = CARImportance((x, y), greedy=False)
    for layer in ("conv1", "layer2.1.conv1"):
        group = DG.get_pruning_group(model.get_submodule(layer), tp.prune_conv_out_channels,
                                     idxs=list(range(model.get_submodule(layer).out_channels)))
        got = imp(group)
        ref = carfast.score_group(model, layer, (x, y), progress=False) if layer == "conv1" else \
            carfast.score_layer(model, layer, (x, y), progress=False)
        assert torch.allclose(got.double(), car_importance(ref), atol=1e-6)
        # higher = more important: ascending importance is carfast's ranking (least important first)
        assert torch.argsort(got, stable=True).tolist()[:3] == ref.ranking("accuracy").tolist()[:3]
        lost = ref.base_correct.sum() - ref.correct.sum(1)
        assert torch.equal(torch.floor(got.double() * ref.num_images + 1e-6).long(), lost)
    assert imp.last_scores is not None


def _group(DG, model, layer):
    m = model.get_submodule(layer)
    return DG.get_pruning_group(m, tp.prune_conv_out_channels, idxs=list(range(m.out_channels)))


@pytest.mark.parametrize("layer, keep", [("layer2.1.conv1", 27), ("conv1", 12)])
def test_greedy_importance_orders_by_greedy_car(layer, keep):
    """Lowest k of the greedy importance = carfast.prune's first k removals (a layer, and the stage-1 group);
    scores rise along the removal order and the channels the greedy did not reach score above them all."""
    model = cifar_resnet(20)
    x, y = _data()
    F = model.get_submodule(layer).out_channels
    imp = CARImportance((x, y), depth=F - keep)(_group(_graph(model), model, layer)).double()
    ref = carfast.prune(model, layer, (x, y), keep=keep, progress=False)
    order = torch.argsort(imp, stable=True).tolist()
    assert order[:F - keep] == ref.removed[layer]
    greedy = imp[ref.removed[layer]]
    assert bool((greedy.diff() > 0).all())
    rest = [f for f in range(F) if f not in ref.removed[layer]]
    assert float(imp[rest].min()) > float(greedy.max())
    # the j-th score is the accuracy the greedy had lost after its j-th removal (running maximum)
    lost = [ref.base["accuracy"] - h["accuracy"] for h in ref.history]
    assert float(greedy[0]) == pytest.approx(lost[0], abs=1e-3)
    assert float(greedy[-1]) == pytest.approx(max(lost), abs=1e-3)


def test_greedy_importance_with_the_race_equals_prune_with_it():
    """search= in CARImportance: with no drops the exact order; with drops the order carfast.prune's race
    makes (the same step seeds), every removal but the last raced."""
    model = cifar_resnet(20)
    x, y = _data()
    layer, keep = "layer2.1.conv1", 28
    F = model.get_submodule(layer).out_channels
    for search in (carfast.Race(delta=0, block=16), carfast.Race(block=16)):
        imp = CARImportance((x, y), depth=F - keep, search=search)(_group(_graph(model), model, layer)).double()
        ref = carfast.prune(model, layer, (x, y), keep=keep, search=search, progress=False)
        order = torch.argsort(imp, stable=True).tolist()
        if search.delta == 0:
            assert order[:F - keep] == ref.removed[layer]
        else:       # the same races (step seeds) but the last step, which CARImportance scores exactly
            assert order[:F - keep - 1] == ref.removed[layer][:-1]
            assert sum(h["evaluations"] for h in ref.history) < sum(h["exhaustive"] for h in ref.history)
    with pytest.raises(ValueError, match="lcb"):
        CARImportance((x, y), rule="lcb", search="race")


def test_bound_greedy_step_is_sequential_greedy_car():
    """Bound to the pruner, one Torch-Pruning step of 25 % on two layers removes what carfast.prune's
    sequential greedy removes (the second layer scored with the first one's removals made)."""
    model, orig = cifar_resnet(20), cifar_resnet(20)
    x, y = _data(32)
    layers = ["layer2.1.conv1", "layer3.1.conv1"]
    frozen = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and n not in layers]
    imp = CARImportance((x, y))
    pruner = tp.pruner.BasePruner(model, EXAMPLE, imp, pruning_ratio=0.25, ignored_layers=[model.linear, *frozen],
                                  customized_pruners=channel_map_pruners(model))
    imp.bind(pruner)
    names = {m: n for n, m in model.named_modules()}
    removed = {names[g[0].dep.target.module]: sorted(int(i) for i in g[0].idxs) for g in pruner.step(interactive=True)}
    ref = carfast.prune(orig, layers, (x, y), keep=0.75, progress=False)
    assert removed == {n: sorted(ref.removed[n]) for n in layers}


def test_unscorable_groups_are_skipped_with_one_warning():
    """A channel shuffle's layer (removal undefined) and a group Torch-Pruning would cut at other indices
    (``a``'s channels are flipped before ``lin`` reads them: Torch-Pruning would cut lin's input k where the
    flip makes it 5 - k): None (left unpruned), one warning naming them before any scoring, and the step
    completes, pruning the rest (the branch's 1x1 conv -> depthwise conv group among them); with a fallback
    importance, that importance's scores."""
    import sys as _sys
    _sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from nets.families import SHAPE, shuffle
    model = shuffle().model
    x = torch.randn(16, *SHAPE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x).argmax(1)
    width = model.unit.branch[5].out_channels
    imp = CARImportance((x, y))
    pruner = tp.pruner.BasePruner(model, x[:1], imp, pruning_ratio=0.25, ignored_layers=[model.fc])
    imp.bind(pruner)
    with pytest.warns(UserWarning, match=r"cannot score 2 group\(s\), left unpruned.*a: for channel 0 of this group "
                                         r"Torch-Pruning would delete input channels \[0\] of 'lin', carfast \[5\].*"
                                         r"unit\.branch\.5.*channel shuffle"):
        pruner.step()
    assert set(imp.skipped) == {"unit.branch.5", "a"}
    assert model.unit.branch[5].out_channels == width and model.a.out_channels == 6 and model.lin.out_features < 4
    assert model.unit.branch[3].out_channels == model.unit.branch[0].out_channels == width - 1     # depthwise
    assert model(x[:2]).shape == (2, 5)

    model = shuffle().model
    magnitude = tp.importance.MagnitudeImportance(p=1)
    group = tp.DependencyGraph().build_dependency(model, example_inputs=x[:1]).get_pruning_group(
        model.unit.branch[5], tp.prune_conv_out_channels, idxs=list(range(width)))
    with pytest.warns(UserWarning, match="scored by the fallback importance"):
        got = CARImportance((x, y), fallback=magnitude)(group)
    assert torch.equal(got, magnitude(group))


def test_merged_groups_without_the_shortcut_pruner_are_refused():
    """Torch-Pruning alone merges the stages through the padding; CAR says so instead of scoring something else."""
    model = cifar_resnet(20)
    x, y = _data(16)
    DG = _graph(model, custom=False)
    group = DG.get_pruning_group(model.conv1, tp.prune_conv_out_channels, idxs=list(range(16)))
    with pytest.raises(ValueError, match="channel_map_pruners"):
        CARImportance((x, y))(group)


@pytest.mark.parametrize("global_pruning", [False, True])
def test_base_pruner_iterative_with_ignored_layers(global_pruning):
    model = cifar_resnet(20)
    x, y = _data(24)
    macs0, _ = tp.utils.count_ops_and_params(model, EXAMPLE)
    imp = CARImportance((x, y))
    pruner = tp.pruner.BasePruner(model, EXAMPLE, imp, pruning_ratio=0.2, iterative_steps=2,
                                  global_pruning=global_pruning,
                                  ignored_layers=[model.linear, model.layer1[0].conv1],
                                  customized_pruners=channel_map_pruners(model))
    imp.bind(pruner)           # the greedy goes only as far as each step needs
    for _ in range(2):
        pruner.step()
    macs, _ = tp.utils.count_ops_and_params(model, EXAMPLE)
    assert macs < 0.9 * macs0
    assert model.layer1[0].conv1.out_channels == 16                       # ignored
    assert model(x[:2]).shape == (2, 10)
    if not global_pruning:                                                # per layer: 20 % of each
        assert model.layer3[1].conv1.out_channels == model.layer3[2].conv1.out_channels == 51
        assert model.conv1.out_channels == model.layer1[2].conv2.out_channels == 12


def test_torch_pruning_surgery_equals_remove_groups():
    """The channels CAR picks, cut by Torch-Pruning, give the network carfast.remove_groups gives."""
    model, orig = cifar_resnet(20), cifar_resnet(20)
    x, y = _data(32)
    imp = CARImportance((x, y))
    pruner = tp.pruner.BasePruner(model, EXAMPLE, imp, pruning_ratio=0.25,
                                  ignored_layers=[model.linear], customized_pruners=channel_map_pruners(model))
    imp.bind(pruner)           # groups in sequence: the residual groups' removals cut on the copy too
    removed, _ = prune_step(pruner, model)
    assert {"conv1", "layer2.0.conv2", "layer3.0.conv2"} <= set(removed)
    ref = carfast.remove_groups(orig, removed)
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x), atol=1e-5)


def test_bad_options_and_missing_package(monkeypatch):
    with pytest.raises(TypeError, match="unknown score options"):
        CARImportance(_data(4), filters=[1])
    with pytest.raises(ValueError, match="depth must be"):
        CARImportance(_data(4), depth=1.5)
    with pytest.raises(ValueError, match="rule must be one of"):
        CARImportance(_data(4), rule="best")
    with pytest.raises(TypeError, match="fallback must be"):
        CARImportance(_data(4), fallback="l1")
    monkeypatch.setitem(sys.modules, "torch_pruning", None)          # as if it were not installed
    monkeypatch.delitem(sys.modules, "carfast.integrations.torch_pruning")
    with pytest.raises(ImportError, match=r"pip install 'carfast\[torch-pruning\]'"):
        importlib.import_module("carfast.integrations.torch_pruning")


def _hand_family(name):
    from nets.deletion import HAND_FAMILIES, SHAPE
    model = HAND_FAMILIES[name]().model
    x = torch.randn(24, *SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


def test_a_group_torch_pruning_deletes_otherwise_is_skipped():
    """A selective kernel: Torch-Pruning's group has carfast's producers, but it would delete the
    attention rows 2c and 2c + 1 where carfast's (and the hand-built network's) are c and C + c. CAR
    does not score a deletion that is not the one Torch-Pruning makes: the group is left alone, with the
    rows named."""
    from carfast.graph import analyze
    from carfast.integrations.torch_pruning import _index_mismatch
    model, x, y = _hand_family("selective_kernel")
    flow = analyze(model, "sk.paths.1.0", x[:1], "test", group=True)
    why = _index_mismatch(_graph(model, example=x[:1]), model.sk.paths[1][0], flow)
    assert "Torch-Pruning would delete output channels [0, 1] of 'sk.fc_select', carfast [0, 6]" in why
    imp = CARImportance((x, y))
    pruner = tp.pruner.BasePruner(model, x[:1], imp, pruning_ratio=0.25, ignored_layers=[model.fc])
    imp.bind(pruner)
    with pytest.warns(UserWarning, match=r"sk\.fc_select: for channel 0 of this group Torch-Pruning would delete .*"
                                         r"Torch-Pruning's deletion is not the one carfast scores"):
        pruner.step()                # Torch-Pruning roots this group at the attention conv
    assert "sk.fc_select" in imp.skipped and model.sk.paths[0][0].out_channels == 6
    assert model.sk.fc_reduce.out_channels < 4 and model.post.out_channels < 6     # the other groups are pruned
    assert model(x[:2]).shape == (2, 5)


def test_torch_pruning_surgery_of_a_repvgg_stream_equals_remove_groups():
    """RepVGG blocks (a layer reading its own group): the channels CAR picks, cut by Torch-Pruning, give the
    network carfast.remove_groups gives."""
    model, x, y = _hand_family("repvgg")
    orig = _hand_family("repvgg")[0]
    imp = CARImportance((x, y))
    pruner = tp.pruner.BasePruner(model, x[:1], imp, pruning_ratio=0.25, ignored_layers=[model.fc])
    imp.bind(pruner)
    removed, _ = prune_step(pruner, model)
    assert not imp.skipped and len(removed) == 2             # the stem and the stream
    ref = carfast.remove_groups(orig, removed, example=x[:1])
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x), atol=1e-5)


# ---- MobileNetV2-style blocks: expand -> depthwise -> squeeze-and-excitation (issue 20) -----------------------
EXPANSION = ("expand", "dw", "se.fc2")     # the producers Torch-Pruning lists for a block's expansion channels


def _mobilenet(n=48):
    from nets import own_labels
    from nets.mobilenet import NUM_CLASSES, SHAPE, make_mobilenet
    model = make_mobilenet()
    x, y = own_labels(model, SHAPE, n, 7, NUM_CLASSES)
    return model, x, y


def _torch_pruning_deletes(model, layer, channels, example):
    """A copy of ``model`` from which Torch-Pruning deleted ``channels`` of ``layer`` (its group with them)."""
    work = copy.deepcopy(model)
    _graph(work, example=example).get_pruning_group(work.get_submodule(layer), tp.prune_conv_out_channels,
                                                    idxs=channels).prune()
    return work


@pytest.mark.parametrize("member", EXPANSION)
def test_depthwise_expansion_group_is_scored_as_torch_pruning_deletes(member, one_thread):
    """Rooted at any of its producers (the expand conv, the depthwise conv, the SE gate's conv), Torch-
    Pruning's group of a block's expansion channels is scored, not refused, and the CAR of channel k is
    what the network Torch-Pruning physically cut k from computes in float64: the images correct (near
    ties aside) and the loss."""
    from naive import margin_of, near_tie
    model, x, y = _mobilenet()
    layer = f"block2.{member}"
    F_ = model.get_submodule(layer).out_channels
    imp = CARImportance((x, y), greedy=False, progress=False)
    got = imp(_group(_graph(model, example=x[:1]), model, layer))
    assert got is not None and not imp.skipped and got.shape == (F_,)
    s = imp.last_scores
    lost = torch.floor(got.double() * s.num_images + 1e-6).long()           # images CAR says the removal loses
    for k in (0, F_ // 2, F_ - 1):
        pruned = _torch_pruning_deletes(model, layer, [k], x[:1]).double()
        assert pruned.block2.dw.out_channels == pruned.block2.se.fc2.out_channels == pruned.block2.project.in_channels \
            == F_ - 1
        with torch.no_grad():
            logits = pruned(x.double())
        correct = int((logits.argmax(1) == y).sum())
        ties = int(near_tie(margin_of(logits), logits).sum())
        assert abs(int(s.base_correct.sum()) - int(lost[k]) - correct) <= ties, k
        assert float(s.loss_sum[k]) == pytest.approx(float(F.cross_entropy(logits, y, reduction="sum")), rel=1e-5), k


def test_torch_pruning_prunes_mobilenet_expansion_groups_as_carfast_deletes(one_thread):
    """Greedy CAR bound to a 12.5 % Torch-Pruning step: every block's expansion group is scored and pruned
    (no warning, nothing skipped), and the network Torch-Pruning cut computes, in float64, the one
    carfast.remove_groups makes of the channels CAR chose."""
    model, x, y = _mobilenet(16)
    orig = copy.deepcopy(model)
    others = [model.fc, model.stem, model.head] + [getattr(model, b).get_submodule(m) for b in model.names
                                                   for m in ("project", "se.fc1")]
    imp = CARImportance((x, y), progress=False)
    pruner = tp.pruner.BasePruner(model, x[:1], imp, pruning_ratio=0.125, ignored_layers=others)
    imp.bind(pruner)
    removed, messages = prune_step(pruner, model)
    assert not imp.skipped and not [m for m in messages if "cannot score" in m]
    for b in orig.names:
        hidden = getattr(orig, b).expand.out_channels
        (root,) = [r for r in removed if r in {f"{b}.{m}" for m in EXPANSION}]
        assert len(removed[root]) == hidden // 8
        block = getattr(model, b)
        assert block.expand.out_channels == block.dw.out_channels == block.se.fc2.out_channels \
            == block.se.fc1.in_channels == block.project.in_channels == hidden - hidden // 8
    assert len(removed) == len(orig.names)
    ref = carfast.remove_groups(orig, removed, example=x[:1])
    with torch.no_grad():
        assert torch.allclose(model.double()(x.double()), ref.double()(x.double()), rtol=0, atol=1e-10)


def test_a_depthwise_conv_with_a_multiplier_is_refused():
    """A depthwise conv with 2 outputs per channel: carfast deletes its rows 2c and 2c + 1 with channel c,
    Torch-Pruning 1.6.1 takes it for a grouped conv and deletes none of its rows: the group is refused, the
    rows named."""
    from nets import own_labels
    from nets.basic import NUM_CLASSES, make_mobilenet_chain_mult2
    case = make_mobilenet_chain_mult2()
    x, y = own_labels(case.model, case.input_shape, 8, 0, NUM_CLASSES)
    imp = CARImportance((x, y), progress=False)
    with pytest.warns(UserWarning, match=r"expand: for channel 0 of this group Torch-Pruning would delete output "
                                         r"channels \[\] of 'dw', carfast \[0, 1\]"):
        assert imp(_group(_graph(case.model, example=x[:1]), case.model, "expand")) is None


def _greedy_pairs(F_, removals, n):
    """(candidate, image) pairs greedy CAR scores making ``removals`` in a group of F_: F_ + (F_ - 1) + ..."""
    return n * sum(F_ - j for j in range(removals))


def test_progress_callable_follows_torch_pruning_steps(one_thread):
    """progress=callable gets (done, total) pairs as CAR scores: bound, over the step's groups (the total
    known at the first report, done rising to it); unbound, over each call's group."""
    model, x, y = _mobilenet(16)
    scored = {"block1.se.fc1", *(f"block1.{m}" for m in EXPANSION)}
    frozen = [m for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
              and n not in scored]
    calls = []
    imp = CARImportance((x, y), progress=lambda done, total: calls.append((done, total)))
    pruner = tp.pruner.BasePruner(model, x[:1], imp, pruning_ratio=0.125, ignored_layers=frozen)
    imp.bind(pruner)
    pruner.step()
    assert model.block1.expand.out_channels == 56 and model.block1.se.fc1.out_channels == 14
    total = _greedy_pairs(64, 8, 16) + _greedy_pairs(16, 2, 16)
    assert len(calls) > 10 and {t for _, t in calls} == {total}
    done = [d for d, _ in calls]
    assert done == sorted(done) and done[-1] == total

    calls.clear()
    unbound = CARImportance((x, y), progress=lambda done, total: calls.append((done, total)))
    unbound(_group(_graph(model, example=x[:1]), model, "block2.se.fc1"))
    assert calls[-1] == (_greedy_pairs(16, 15, 16), _greedy_pairs(16, 15, 16))
