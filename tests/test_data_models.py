"""Bundled models and data load with weights_only and give the published accuracy."""
import os
from importlib import resources

import numpy as np
import pytest
import torch

from carfast.data import cifar10_classes, cifar10_test
from carfast.models import alexnet_cifar, cifar_resnet


def test_bundled_slice_is_class_balanced():
    x, y = cifar10_test()
    assert x.shape == (2000, 3, 32, 32) and x.dtype == torch.float32
    assert torch.bincount(y).tolist() == [200] * 10
    assert torch.bincount(cifar10_test(n=25)[1], minlength=10).tolist() == [3] * 5 + [2] * 5
    assert cifar10_classes()[0] == "airplane" and len(cifar10_classes()) == 10


@pytest.mark.parametrize("depth, low", [(20, 0.90), (56, 0.91)])
def test_pretrained_resnets_classify_the_bundled_slice(depth, low):
    x, y = cifar10_test(n=500)
    model = cifar_resnet(depth)
    assert not model.training
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc > low


def test_full_copy_path(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "t.npz", x=x, y=np.arange(7) % 10)
    xs, ys = cifar10_test(path=tmp_path / "t.npz")
    assert xs.shape == (7, 3, 32, 32) and ys.tolist() == list(range(7))


def test_bad_paths_and_sizes(tmp_path):
    with pytest.raises(FileNotFoundError, match="no file at"):
        cifar10_test(path=tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="asked for n=5000 images but the source holds 2000"):
        cifar10_test(n=5000)
    with pytest.raises(ValueError, match="depth must be 6n\\+2"):
        cifar_resnet(21)
    with pytest.raises(ValueError, match="no bundled weights for depth 32"):
        cifar_resnet(32)


def test_alexnet_shape():
    model = alexnet_cifar()
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert model.features[0].out_channels == 64 and model.features[0].kernel_size == (5, 5)


SHARED_ALEXNET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "models",
                              "alexnet_cifar.pt")


def test_bundled_alexnet_loads_with_weights_only_and_classifies():
    from carfast.models import ALEXNET_CIFAR_NORMALIZATION
    with resources.as_file(resources.files("carfast.assets") / "alexnet_cifar10_fp16.pt") as p:
        stored = torch.load(p, map_location="cpu", weights_only=True)       # plain data: no pickled code
    assert stored["state_dict"]["features.0.weight"].dtype == torch.float16
    assert [float(v) for v in stored["mean"]] == pytest.approx(ALEXNET_CIFAR_NORMALIZATION[0], abs=1e-6)
    model = alexnet_cifar()
    assert not model.training and model.features[0].weight.dtype == torch.float32
    x, y = cifar10_test(n=200, normalization=ALEXNET_CIFAR_NORMALIZATION)
    with torch.no_grad():
        bundled = (model(x).argmax(1) == y).float().mean().item()
    assert bundled > 0.7                                                    # chance: 0.1
    if os.path.exists(SHARED_ALEXNET):            # the float32 original: float16 storage costs no accuracy
        with torch.no_grad():
            original = (alexnet_cifar(SHARED_ALEXNET)(x).argmax(1) == y).float().mean().item()
        assert abs(bundled - original) <= 0.005
    untrained = alexnet_cifar(pretrained=False)
    assert not torch.equal(untrained.features[0].weight, model.features[0].weight)
