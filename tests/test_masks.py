"""carfast.integrations.masks: torch.nn.utils.prune masks equal the physically pruned model, and back."""
from __future__ import annotations

import pytest
import torch
from nets import NETS, SCORABLE, make_data
from torch.nn.utils import prune as torch_prune

import carfast
from carfast import data, models
from carfast.graph import target_num_filters
from carfast.integrations.masks import from_masks, to_masks


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_resnet20_masks_equal_surgery_and_round_trip():
    model = models.cifar_resnet(20).eval()
    removals = {"layer1.0.conv1": [0, 5, 9], "layer2.1.conv1": [3, 4], "layer3.2.conv1": list(range(0, 64, 3))}
    before = _state(model)
    masked = to_masks(model, removals)
    pruned = carfast.remove_filters(model, removals)
    x, _ = data.cifar10_test(64)
    with torch.no_grad():
        a, b, full = masked.eval()(x), pruned.eval()(x), model(x)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a, full)                  # the masks do something
    assert from_masks(masked) == {k: sorted(v) for k, v in removals.items()}
    assert all(torch.equal(v, _state(model)[k]) for k, v in before.items())   # the user's model is untouched
    assert not any(hasattr(m, "weight_mask") for m in model.modules())
    # made permanent with torch.nn.utils.prune.remove, the outputs stay
    for m in masked.modules():
        for p in ("weight", "bias"):
            if hasattr(m, p + "_mask"):
                torch_prune.remove(m, p)
    with torch.no_grad():
        torch.testing.assert_close(masked(x), b, atol=1e-5, rtol=1e-5)


def test_a_prune_result_turns_into_masks():
    model = models.cifar_resnet(20).eval()
    x, y = data.cifar10_test(100)
    result = carfast.prune(model, ["layer2.0.conv1"], (x, y), keep=28, progress=False)
    masked = to_masks(model, result)
    with torch.no_grad():
        torch.testing.assert_close(masked.eval()(x), result.model.eval()(x), atol=1e-5, rtol=1e-5)
    assert from_masks(masked) == {"layer2.0.conv1": sorted(result.removed["layer2.0.conv1"])}


@pytest.mark.parametrize("net", SCORABLE)
def test_synthetic_nets_masks_equal_surgery(net):
    case = NETS[net]()
    x, _ = make_data(case, 8)
    n = target_num_filters(dict(case.model.named_modules())[case.layer])
    removals = {case.layer: [0, n - 1]}
    masked = to_masks(case.model, removals, example=x[:1])
    pruned = carfast.remove_filters(case.model, removals, example=x[:1])
    with torch.no_grad():
        torch.testing.assert_close(masked.eval()(x), pruned.eval()(x), atol=1e-5, rtol=1e-4)


def test_inplace_and_bad_input():
    model = models.cifar_resnet(20).eval()
    same = to_masks(model, {"layer1.0.conv1": [1]}, inplace=True)
    assert same is model and from_masks(model) == {"layer1.0.conv1": [1]}
    with pytest.raises(ValueError, match="to_masks: filter indices \\[99\\] are out of range"):
        to_masks(models.cifar_resnet(20), {"layer1.0.conv1": [99]})
    with pytest.raises(TypeError, match="to_masks: pass a carfast.PruneResult or a dict"):
        to_masks(models.cifar_resnet(20), [1, 2])
    with pytest.raises(ValueError, match="to_masks"):          # coupled channels are refused, naming the caller
        to_masks(models.cifar_resnet(20), {"layer1.0.conv2": [1]})
