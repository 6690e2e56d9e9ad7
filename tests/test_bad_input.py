"""Bad input: each gets a clear error naming the problem and the fix, and changes nothing."""
import pytest
import torch
from torch import nn

import carfast
from carfast.models import cifar_resnet


@pytest.fixture(scope="module")
def resnet():
    return cifar_resnet(20)


@pytest.fixture(scope="module")
def data():
    return carfast.data.cifar10_test(n=20)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()]


def _unchanged(model, before):
    state, flags = before
    after = model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)
    assert flags == [m.training for m in model.modules()]


def test_unknown_layer_suggests_nearest(resnet, data):
    with pytest.raises(ValueError, match=r"'layer3\.9\.conv1' not found.*did you mean.*'layer3\.[0-9]\.conv1'"):
        carfast.score_layer(resnet, "layer3.9.conv1", data)


def test_layer_of_wrong_type(resnet, data):
    with pytest.raises(TypeError, match=r"'layer1\.0\.bn1' is a BatchNorm2d.*Conv2d or the features of a Linear"):
        carfast.score_layer(resnet, "layer1.0.bn1", data)


def test_module_not_in_model(resnet, data):
    with pytest.raises(ValueError, match="not part of the model"):
        carfast.score_layer(resnet, nn.Conv2d(3, 3, 1), data)


def test_no_consumer_on_path_to_output(resnet, data):
    with pytest.raises(ValueError, match="produces the model.s outputs"):
        carfast.score_layer(resnet, "linear", data)


def test_labels_outside_classes(resnet, data):
    x, y = data
    before = _state(resnet)
    with pytest.raises(ValueError, match=r"label 10 is outside the model's 10 classes \(0\.\.9\)"):
        carfast.score_layer(resnet, "layer3.2.conv1", (x, torch.full_like(y, 10)))
    with pytest.raises(ValueError, match="label -1 is outside"):
        carfast.score_layer(resnet, "layer3.2.conv1", (x, torch.full_like(y, -1)))
    _unchanged(resnet, before)


def test_float_labels(resnet, data):
    x, y = data
    with pytest.raises(TypeError, match="labels must be integer class indices"):
        carfast.score_layer(resnet, "layer3.2.conv1", (x, y.float()))


@pytest.mark.parametrize("data_arg", [(torch.zeros(0, 3, 32, 32), torch.zeros(0, dtype=torch.long)), []])
def test_empty_data(resnet, data_arg):
    with pytest.raises(ValueError, match="no images|empty"):
        carfast.score_layer(resnet, "layer3.2.conv1", data_arg)


def test_lengths_differ(resnet, data):
    x, y = data
    with pytest.raises(ValueError,
                       match=r"inputs and labels differ in length: inputs \(20, 3, 32, 32\), labels \(19,\)"):
        carfast.score_layer(resnet, "layer3.2.conv1", (x, y[:19]))


def test_data_not_pairs(resnet, data):
    with pytest.raises(TypeError, match="pass the labels too"):
        carfast.score_layer(resnet, "layer3.2.conv1", data[0])


def test_non_finite_output(resnet, data):
    x, y = data
    x = x.clone()
    x[3] = float("nan")
    with pytest.raises(ValueError, match=r"not finite \(NaN or inf\) for images at chunk positions \[3\]"):
        carfast.score_layer(resnet, "layer3.2.conv1", (x, y))


@pytest.mark.parametrize("filters, message", [
    ([0, 64], r"filter 64 is out of range: layer 'layer3\.2\.conv1' has 64 filters \(0\.\.63\)"),
    ([-1], "filter -1 is out of range"),
    ([3, 5, 3], r"filters repeat \[3\]"),
    ([], "filters is empty"),
])
def test_bad_filters(resnet, data, filters, message):
    with pytest.raises(ValueError, match=message):
        carfast.score_layer(resnet, "layer3.2.conv1", data, filters=filters)


def test_float_filters(resnet, data):
    with pytest.raises(TypeError, match="filters must be a 1-D list of int"):
        carfast.score_layer(resnet, "layer3.2.conv1", data, filters=[0.5])


def test_memory_budget_too_small_for_one_image(resnet, data):
    with pytest.raises(ValueError, match=r"memory_budget=1000 bytes is too small for one image.*raise memory_budget"):
        carfast.score_layer(resnet, "layer1.0.conv1", data, memory_budget=1000)


@pytest.mark.parametrize("budget", [0, -5, "1GB"])
def test_memory_budget_not_positive(resnet, data, budget):
    with pytest.raises(ValueError, match="memory_budget must be a positive number of bytes"):
        carfast.score_layer(resnet, "layer1.0.conv1", data, memory_budget=budget)


def test_unknown_backend(resnet, data):
    with pytest.raises(ValueError, match="backend 'gpu' unknown; choose one of auto, torch, cpu, triton, cuda"):
        carfast.score_layer(resnet, "layer3.2.conv1", data, backend="gpu")


def test_missing_backend_named_explicitly_raises_with_reason(resnet, data):
    missing = [b for b in carfast.backends() if not b["available"]]
    if not missing:
        pytest.skip("every backend is available here")
    b = missing[0]
    with pytest.raises(RuntimeError, match=b["name"]):
        carfast.score_layer(resnet, "layer3.2.conv1", data, backend=b["name"])


def test_model_not_a_module(data):
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        carfast.score_layer(lambda x: x, "conv", data)


# ---- what data may be: numpy arrays, Datasets, dtypes ------------------------------------------------------

def test_numpy_arrays_and_datasets_score_like_tensors(resnet, data):
    x, y = data
    ref = carfast.score_layer(resnet, "layer3.2.conv1", (x, y), progress=False)
    from_numpy = carfast.score_layer(resnet, "layer3.2.conv1", (x.numpy(), y.numpy()), progress=False)
    dataset = carfast.score_layer(resnet, "layer3.2.conv1", torch.utils.data.TensorDataset(x, y), progress=False)
    batches = carfast.score_layer(resnet, "layer3.2.conv1", [(x[:7].numpy(), y[:7].tolist()), (x[7:], y[7:])],
                                  progress=False)
    for r in (from_numpy, dataset, batches):
        assert torch.equal(r.correct, ref.correct) and r.num_images == ref.num_images


def test_float64_inputs_are_cast_to_the_model(resnet, data):
    x, y = data
    ref = carfast.score_layer(resnet, "layer3.2.conv1", (x, y), progress=False)
    got = carfast.score_layer(resnet, "layer3.2.conv1", (x.double(), y), progress=False)
    assert torch.equal(got.correct, ref.correct)


def test_bad_dtypes_and_batches_say_what_to_pass(resnet, data):
    x, y = data
    before = _state(resnet)
    with pytest.raises(TypeError, match=r"inputs are torch\.uint8 .*x\.float\(\) / 255"):
        carfast.score_layer(resnet, "layer3.2.conv1", ((x * 50).to(torch.uint8), y), progress=False)
    with pytest.raises(ValueError, match=r"parameters are torch\.float64.*\.float\(\)"):
        carfast.score_layer(resnet.double(), "layer3.2.conv1", (x, y), progress=False)
    resnet.float()
    with pytest.raises(TypeError, match=r"a batch is a dict .*\(b\['image'\], b\['label'\]\)"):
        carfast.score_layer(resnet, "layer3.2.conv1", [{"image": x, "label": y}], progress=False)
    _unchanged(resnet, before)
