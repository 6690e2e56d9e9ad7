"""carfast.integrations.torch_pruning: CAR as a Torch-Pruning importance, and the option-A shortcut pruner."""
from __future__ import annotations

import importlib
import sys

import pytest
import torch

import carfast
from carfast.groups import find_group
from carfast.models import cifar_resnet

tp = pytest.importorskip("torch_pruning", reason="Torch-Pruning is not installed (pip install '.[test]')")
from carfast.integrations.torch_pruning import CARImportance, car_importance, channel_map_pruners  # noqa: E402

EXAMPLE = torch.zeros(1, 3, 32, 32)


def _data(n=48):
    return carfast.data.cifar10_test(n)


def _graph(model, custom=True):
    return tp.DependencyGraph().build_dependency(model, example_inputs=EXAMPLE,
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


def test_importance_is_car_with_loss_tie_break():
    model = cifar_resnet(20)
    x, y = _data()
    DG = _graph(model)
    imp = CARImportance((x, y))
    for layer in ("conv1", "layer2.1.conv1"):
        group = DG.get_pruning_group(model.get_submodule(layer), tp.prune_conv_out_channels,
                                     idxs=list(range(model.get_submodule(layer).out_channels)))
        got = imp(group)
        ref = carfast.score_group(model, layer, (x, y), progress=False) if layer == "conv1" else \
            carfast.score_layer(model, layer, (x, y), progress=False)
        assert torch.allclose(got.double(), car_importance(ref), atol=1e-6)
        # higher = more important: ascending importance is carfast's ranking (least important first)
        assert torch.argsort(got, stable=True).tolist()[:3] == ref.ranking().tolist()[:3]
        lost = ref.base_correct.sum() - ref.correct.sum(1)
        assert torch.equal(torch.floor(got.double() * ref.num_images + 1e-6).long(), lost)
    assert imp.last_scores is not None


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
    x, y = _data()
    macs0, _ = tp.utils.count_ops_and_params(model, EXAMPLE)
    pruner = tp.pruner.BasePruner(model, EXAMPLE, CARImportance((x, y)), pruning_ratio=0.2, iterative_steps=2,
                                  global_pruning=global_pruning,
                                  ignored_layers=[model.linear, model.layer1[0].conv1],
                                  customized_pruners=channel_map_pruners(model))
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
    pruner = tp.pruner.BasePruner(model, EXAMPLE, CARImportance((x, y)), pruning_ratio=0.25,
                                  ignored_layers=[model.linear], customized_pruners=channel_map_pruners(model))
    names = {m: n for n, m in model.named_modules()}
    removed = {}
    for group in pruner.step(interactive=True):
        removed[names[group[0].dep.target.module]] = sorted(int(i) for i in group[0].idxs)
        group.prune()
    assert {"conv1", "layer2.0.conv2", "layer3.0.conv2"} <= set(removed)
    ref = carfast.remove_groups(orig, removed)
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x), atol=1e-5)


def test_bad_options_and_missing_package(monkeypatch):
    with pytest.raises(TypeError, match="unknown score options"):
        CARImportance(_data(4), filters=[1])
    monkeypatch.setitem(sys.modules, "torch_pruning", None)          # as if it were not installed
    monkeypatch.delitem(sys.modules, "carfast.integrations.torch_pruning")
    with pytest.raises(ImportError, match=r"pip install 'carfast\[torch-pruning\]'"):
        importlib.import_module("carfast.integrations.torch_pruning")
