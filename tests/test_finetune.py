"""finetune / random_crop_flip on a tiny synthetic problem; cifar10_train on a tiny JPEG npz."""
import io
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from carfast.data import cifar10_train, decode_jpegs
from carfast.finetune import FinetuneConfig, finetune, random_crop_flip
from carfast.models import ALEXNET_CIFAR_NORMALIZATION, CIFAR_RESNET_NORMALIZATION
from carfast.pruning.evaluate import evaluate

Image = pytest.importorskip("PIL.Image")


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Dropout(0.1), nn.Linear(8, 3)).eval()


def _data(n=192):
    """Class c brightens channel c: learnable by the net above, hard for the untrained one."""
    g = torch.Generator().manual_seed(1)
    y = torch.arange(n) % 3
    x = torch.randn(n, 3, 8, 8, generator=g)
    x[torch.arange(n), y] += 1.0
    return x, y


def _loss(model, x, y):
    with torch.no_grad():
        return F.cross_entropy(model.eval()(x), y).item()


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_finetune_reduces_loss_and_leaves_model_alone():
    model, (x, y) = _net(), _data()
    model[1].train()                                  # a mixed flag state that must survive
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    loss0 = _loss(_net(), x, y)
    out = finetune(model, (x, y), dict(epochs=6, lr=0.05, batch_size=32, augment=False), progress=False)
    assert out is not model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [m.training for m in model.modules()] == flags
    assert not any(m.training for m in out.modules())
    assert torch.equal(torch.get_rng_state(), rng)    # the caller's RNG is not consumed
    assert _loss(out, x, y) < 0.6 * loss0
    assert evaluate(out, (x, y)).accuracy > evaluate(_net(), (x, y)).accuracy + 0.2


def test_finetune_is_deterministic_and_dict_equals_config():
    model, data = _net(), _data()
    cfg = FinetuneConfig(epochs=1, lr=0.03, batch_size=40, augment=True, label_smoothing=0.1, seed=7)
    a = finetune(model, data, cfg, progress=False)
    b = finetune(model, data, cfg.to_dict(), progress=False)
    assert _same_weights(a, b)
    c = finetune(model, data, dict(cfg.to_dict(), seed=8), progress=False)
    assert not _same_weights(a, c)


def test_progress_counts_images_with_max_images_and_dropped_single():
    calls = []
    model, (x, y) = _net(), _data(33)
    finetune(model, (x, y), dict(batch_size=16, epochs=2), progress=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (64, 64) and len(calls) == 4   # 33 = 16 + 16 + a single image, dropped
    calls.clear()
    finetune(model, (x, y), dict(batch_size=8, epochs=2, max_images=20),
             progress=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (40, 40) and len(calls) == 6   # 20 = 8 + 8 + 4, twice


def test_iterable_batches():
    model, (x, y) = _net(), _data()
    batches = [(x[i:i + 32], y[i:i + 32]) for i in range(0, len(y), 32)]
    out = finetune(model, batches, dict(epochs=6, lr=0.05, augment=False), progress=False)
    assert _loss(out, x, y) < 0.6 * _loss(_net(), x, y)
    one_shot = (b for b in batches)
    with pytest.raises(ValueError, match="cosine schedule needs"):
        finetune(model, one_shot, progress=False)
    with pytest.raises(ValueError, match="epoch 1 got no batches"):
        finetune(model, (b for b in batches), dict(epochs=2, schedule="constant"), progress=False)


@pytest.mark.parametrize("bn_stats", ["freeze", "update"])
def test_bn_stats_frozen_or_updated(bn_stats):
    model, (x, y) = _net(), _data()
    out = finetune(model, (x, y), dict(epochs=1, lr=0.05, batch_size=32, bn_stats=bn_stats), progress=False)
    same = torch.equal(out[1].running_mean, model[1].running_mean) and \
        torch.equal(out[1].running_var, model[1].running_var)
    assert same == (bn_stats == "freeze")
    assert not torch.equal(out[1].weight, model[1].weight)       # BN's affine weights train either way


@pytest.mark.parametrize("schedule,lrs", [("cosine", [0.2, 0.1]), ("constant", [0.2, 0.2])])
def test_schedule_matches_hand_written_sgd(schedule, lrs):
    """Two full-batch steps of plain SGD: cosine over 2 steps uses lr, then lr * (1 + cos(pi / 2)) / 2."""
    torch.manual_seed(0)
    model, x, y = nn.Linear(4, 3), torch.randn(8, 4), torch.arange(8) % 3
    cfg = dict(epochs=2, lr=0.2, batch_size=8, momentum=0.0, nesterov=False, weight_decay=0.0, augment=False,
               schedule=schedule)
    out = finetune(model, (x, y), cfg, progress=False)
    ref = nn.Linear(4, 3)
    ref.load_state_dict(model.state_dict())
    for lr in lrs:
        ref.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        with torch.no_grad():
            for p in ref.parameters():
                p -= lr * p.grad
    assert torch.allclose(out.weight, ref.weight, atol=1e-6) and torch.allclose(out.bias, ref.bias, atol=1e-6)


@pytest.mark.parametrize("bad", [dict(epochs=0), dict(epochs=1.5), dict(epochs=True), dict(lr=0), dict(lr=-0.1),
                                 dict(lr=float("nan")), dict(lr=float("inf")), dict(momentum=1.0),
                                 dict(batch_size=0), dict(schedule="linear"), dict(augment="yes"),
                                 dict(label_smoothing=1.0), dict(max_images=0), dict(weight_decay=-1e-4),
                                 dict(seed=1.5), dict(momentum=0.0, nesterov=True),
                                 dict(bn_stats="recalibrate")])
def test_config_validation(bad):
    with pytest.raises(ValueError, match="FinetuneConfig"):
        FinetuneConfig(**bad)
    with pytest.raises(ValueError):
        finetune(_net(), _data(), bad, progress=False)


def test_config_unknown_key_and_bad_inputs():
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['epoch'\].*'epochs'"):
        finetune(_net(), _data(), {"epoch": 2})
    with pytest.raises(TypeError, match="config must be"):
        finetune(_net(), _data(), [("epochs", 1)])
    x, y = _data()
    with pytest.raises(ValueError, match="label 5 is outside"):
        finetune(_net(), (x, y.clone().index_fill_(0, torch.tensor([3]), 5)), progress=False)
    with pytest.raises(RuntimeError, match="loss became nan"):
        finetune(_net(), (torch.full_like(x, float("nan")), y), dict(augment=False), progress=False)
    with pytest.raises(ValueError, match="augment=False"):
        finetune(nn.Linear(4, 3), (torch.randn(8, 4), y[:8]), progress=False)
    lin = finetune(nn.Linear(4, 3), (torch.randn(8, 4), y[:8]), dict(augment=False), progress=False)
    assert isinstance(lin, nn.Linear)


@pytest.mark.parametrize("shape", [(1, 1, 5, 7), (6, 3, 8, 8), (2, 2, 3, 3)])
def test_random_crop_flip_is_a_window_of_the_padded_image(shape):
    x = torch.randn(shape)
    out = random_crop_flip(x, 4, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    h, w = shape[2:]
    padded = F.pad(x, (4,) * 4, mode="reflect" if min(h, w) > 4 else "constant")
    for i in range(shape[0]):
        windows = [padded[i, :, r:r + h, c:c + w] for r in range(9) for c in range(9)]
        assert any(torch.equal(out[i], v) or torch.equal(out[i], v.flip(-1)) for v in windows)
    again = random_crop_flip(x, 4, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


@pytest.mark.parametrize("fill", [0.0, -1.5, (-2.0, 0.5, 3.0)])
def test_random_crop_flip_pads_with_the_fill(fill):
    """A constant ``fill`` (one value, or one per channel) pads instead of reflection; the image itself is
    copied unchanged."""
    x = torch.randn(16, 3, 8, 8)
    out = random_crop_flip(x, 4, torch.Generator().manual_seed(0), fill=fill)
    value = torch.as_tensor(fill, dtype=x.dtype).reshape(-1, 1, 1).expand(3, 16, 16)
    padded = value.clone().unsqueeze(0).repeat(16, 1, 1, 1)
    padded[:, :, 4:12, 4:12] = x
    for i in range(16):
        windows = [padded[i, :, r:r + 8, c:c + 8] for r in range(9) for c in range(9)]
        assert any(torch.equal(out[i], v) or torch.equal(out[i], v.flip(-1)) for v in windows)
    assert (out == value[:, :8, :8]).any()          # some border was padded
    with pytest.raises(ValueError, match="fill has 2 values for 3 channels"):
        random_crop_flip(x, 4, fill=(0.0, 1.0))


def test_random_crop_flip_varies():
    x = torch.randn(32, 3, 8, 8)
    out = random_crop_flip(x, 4, torch.Generator().manual_seed(0))
    assert sum(not torch.equal(out[i], x[i]) for i in range(32)) >= 28


# ---- cifar10_train on a tiny npz of real JPEGs -------------------------------------------------------

def _colour(c, k):
    return (40 * c + 10 * k + 20, 200 - 30 * k, 100)


def _jpeg(arr, quality=95):
    f = io.BytesIO()
    Image.fromarray(arr).save(f, "JPEG", quality=quality)
    return f.getvalue()


def _write(path, files, labels, **extra):
    offsets = np.cumsum([0] + [len(b) for b in files]).astype(np.int64)
    blob = np.frombuffer(b"".join(files), dtype=np.uint8)
    np.savez(path, jpeg_bytes=blob, offsets=offsets, labels=np.asarray(labels, np.int64), **extra)
    return path


@pytest.fixture
def tiny(tmp_path):
    """3 classes x 4 solid-colour images, file order mixed: image k of class c has colour _colour(c, k)."""
    order = [(c, k) for k in range(4) for c in (2, 0, 1)]
    files = [_jpeg(np.full((32, 32, 3), _colour(c, k), np.uint8)) for c, k in order]
    path = _write(tmp_path / "train.npz", files, [c for c, _ in order], classes=np.array(["a", "b", "c"]))
    return path, order


def _ids(x, normalization=CIFAR_RESNET_NORMALIZATION):
    mean, std = (torch.tensor(v).view(1, 3) for v in normalization)
    rgb = (x.mean((2, 3)) * std + mean) * 255
    return [tuple(int(round(v)) for v in px.tolist()) for px in rgb]


def test_cifar10_train_all_and_normalisation(tiny):
    path, order = tiny
    x, y = cifar10_train(path)
    assert x.shape == (12, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert y.tolist() == [c for c, _ in order]
    for got, (c, k) in zip(_ids(x), order):
        assert max(abs(a - b) for a, b in zip(got, _colour(c, k))) <= 2
    x2, _ = cifar10_train(path, normalization=ALEXNET_CIFAR_NORMALIZATION)
    assert _ids(x2, ALEXNET_CIFAR_NORMALIZATION) == _ids(x)
    assert not torch.allclose(x, x2)


def test_cifar10_train_balanced_subsets(tiny):
    path, _ = tiny
    x, y = cifar10_train(path, 7)
    assert torch.bincount(y).tolist() == [3, 2, 2] and y[:6].tolist() == [0, 1, 2, 0, 1, 2]
    firsts = [_colour(c, k) for k in range(2) for c in range(3)]
    assert all(max(abs(a - b) for a, b in zip(g, e)) <= 2 for g, e in zip(_ids(x[:6]), firsts))
    a, b = cifar10_train(path, 6, seed=3), cifar10_train(path, 6, seed=3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    picks = {tuple(_ids(cifar10_train(path, 3, seed=s)[0])) for s in range(8)}
    assert len(picks) > 1


def test_decode_fast_path_equals_pillow_open(tmp_path):
    g = np.random.default_rng(0)
    files = [_jpeg(g.integers(0, 256, (32, 32, 3), dtype=np.uint8), 75) for _ in range(3)]
    files.append(_jpeg(g.integers(0, 256, (32, 32), dtype=np.uint8), 75))          # greyscale JPEG
    offsets = np.cumsum([0] + [len(b) for b in files])
    out = decode_jpegs(np.frombuffer(b"".join(files), np.uint8), offsets, [3, 0, 2])
    for j, i in enumerate([3, 0, 2]):
        assert np.array_equal(out[j], np.asarray(Image.open(io.BytesIO(files[i])).convert("RGB")))


def test_cifar10_train_errors(tiny, tmp_path, monkeypatch):
    path, _ = tiny
    with pytest.raises(FileNotFoundError, match=r"nope\.npz.*pass path="):
        cifar10_train(tmp_path / "nope.npz")
    with pytest.raises(TypeError, match="path is required"):
        cifar10_train(None)
    for n in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="n must be"):
            cifar10_train(path, n)
    with pytest.raises(ValueError, match="n=13 images but"):
        cifar10_train(path, 13)
    np.savez(tmp_path / "nokeys.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match=r"lacks \['jpeg_bytes', 'offsets', 'labels'\]"):
        cifar10_train(tmp_path / "nokeys.npz")
    ok = _jpeg(np.zeros((32, 32, 3), np.uint8))
    bad = _write(tmp_path / "bad.npz", [ok, ok, b"\xff\xd8 not a jpeg at all"], [0, 1, 2])
    with pytest.raises(ValueError, match="image 2 is not a readable JPEG"):
        cifar10_train(bad)
    small = _write(tmp_path / "small.npz", [ok, _jpeg(np.zeros((16, 16, 3), np.uint8))], [0, 1])
    with pytest.raises(ValueError, match="image 1 is 16x16 pixels"):
        cifar10_train(small)
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ImportError, match="pip install pillow"):
        cifar10_train(path)
