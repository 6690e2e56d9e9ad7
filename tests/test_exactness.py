"""carfast.score_layer against the naive reference (tests/naive.py), image by image.

Every accuracy figure must equal the naive masked re-run of the full network in float32; the only
allowed differences are images whose top-1 is a near tie in the naive run itself (margin under 1e-5 of
the logit scale). These tests use exactly the public API:

    res = carfast.score_layer(model, layer, data, *, filters=None, device=None, batch_size=None,
                              memory_budget=None, backend="auto", progress=None, per_image=False)
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from naive import naive_scores, near_tie, per_class_counts
from nets import NETS, SCORABLE, make_data
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import carfast
import carfast.data
import carfast.models
from carfast.data import cifar10_test
from carfast.models import cifar_resnet

N_SYNTH = 200            # images per synthetic net
N_RESNET = 500           # images of the bundled CIFAR-10 slice for ResNet-20
BACKENDS = ["torch", "auto"]
SMALL_BUDGET = 1 << 20   # bytes: forces many chunks on most synthetic nets (a few images per chunk)
METHODS = {"closed_form", "suffix", "full_network"}
RESNET_LAYERS = {                  # target -> its consumer (width 1)
    "layer1.0.conv1": "layer1.0.conv2",
    "layer2.1.conv1": "layer2.1.conv2",
    "layer3.2.conv1": "layer3.2.conv2",
}


# ---------------------------------------------------------------------------------------------------
# the oracle, cached per net (models are rebuilt fresh for every call of carfast: factories are seeded)


def _num_filters(model: nn.Module, layer: str) -> int:
    m = model.get_submodule(layer)
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


@functools.lru_cache(maxsize=None)
def synth_reference(name: str):
    case = NETS[name]()
    x, y = make_data(case, N_SYNTH, seed=0)
    ref = naive_scores(case.model, case.consumers, x, y, range(_num_filters(case.model, case.layer)))
    return x, y, ref


@functools.lru_cache(maxsize=None)
def resnet_data(n: int = N_RESNET):
    return carfast.data.cifar10_test(n=n)


@functools.lru_cache(maxsize=None)
def resnet_reference(layer: str, n: int = N_RESNET):
    model = carfast.models.cifar_resnet(20)
    x, y = resnet_data(n)
    return x, y, naive_scores(model, {RESNET_LAYERS[layer]: 1}, x, y, range(_num_filters(model, layer)))


def _subset(ref, filters):
    """The naive result restricted to ``filters`` (indices into the full, 0..K-1 ordered run)."""
    idx = torch.as_tensor(filters, dtype=torch.long)
    return type(ref)(
        filters=ref.filters[idx], labels=ref.labels, base_logits=ref.base_logits, logits=ref.logits[idx],
        base_pred=ref.base_pred, pred=ref.pred[idx], base_correct=ref.base_correct, correct=ref.correct[idx],
        base_loss=ref.base_loss, loss=ref.loss[idx], base_margin=ref.base_margin, margin=ref.margin[idx])


# ---------------------------------------------------------------------------------------------------
# comparison


def assert_matches_naive(res, ref, *, what: str, per_image: bool = True):
    """Check a LayerScores against a NaiveResult; failure messages name the filter, images and values."""
    n, c = ref.labels.numel(), ref.num_classes
    assert torch.equal(res.filters.cpu().to(torch.int64), ref.filters), \
        f"{what}: filters {res.filters.tolist()} != requested {ref.filters.tolist()}"
    assert res.filters.dtype == torch.int64, f"{what}: filters dtype {res.filters.dtype}"
    assert res.num_images == n, f"{what}: num_images {res.num_images} != {n}"
    assert res.class_totals.tolist() == torch.bincount(ref.labels, minlength=c).tolist(), \
        f"{what}: class_totals {res.class_totals.tolist()}"
    assert res.base_correct.tolist() == ref.base_class_counts(c).tolist(), \
        f"{what}: base_correct {res.base_correct.tolist()} != naive {ref.base_class_counts(c).tolist()}"
    assert tuple(res.correct.shape) == (len(ref.filters), c), f"{what}: correct shape {tuple(res.correct.shape)}"
    assert not res.coupled

    ties = near_tie(ref.margin, ref.logits)                      # [F, N]
    if per_image:
        assert res.image_correct is not None and res.base_image_correct is not None, \
            f"{what}: per_image=True but image_correct / base_image_correct missing"
        base_img = res.base_image_correct.cpu().to(torch.bool)
        bad = (base_img != ref.base_correct).nonzero().flatten().tolist()
        assert not bad, (f"{what}: base_image_correct differs from naive at images {bad[:10]} "
                         f"(carfast {base_img[bad[:10]].tolist()}, naive {ref.base_correct[bad[:10]].tolist()}, "
                         f"naive margin {ref.base_margin[bad[:10]].tolist()})")
        img = res.image_correct.cpu().to(torch.bool)
        assert tuple(img.shape) == tuple(ref.correct.shape), f"{what}: image_correct shape {tuple(img.shape)}"
        mismatch = img != ref.correct
        real = mismatch & ~ties
        if real.any():
            lines = []
            for fi in real.any(1).nonzero().flatten().tolist()[:5]:
                ims = real[fi].nonzero().flatten().tolist()
                k = int(ref.filters[fi])
                lines.append(
                    f"filter {k}: {len(ims)} images, e.g. {ims[:8]}: carfast correct {img[fi, ims[:8]].tolist()}, "
                    f"naive correct {ref.correct[fi, ims[:8]].tolist()}, naive pred {ref.pred[fi, ims[:8]].tolist()}, "
                    f"label {ref.labels[ims[:8]].tolist()}, base pred {ref.base_pred[ims[:8]].tolist()}, "
                    f"naive margin {[f'{v:.3g}' for v in ref.margin[fi, ims[:8]].tolist()]}")
            pytest.fail(f"{what}: {int(real.sum())} (filter, image) pairs differ from the naive reference "
                        f"and are not near ties ({int(mismatch.sum())} differences in all):\n  " + "\n  ".join(lines))
        # counts are the per-class sums of the per-image results, exactly
        own = per_class_counts(img, ref.labels, c)
        assert torch.equal(res.correct.cpu().to(torch.int64), own), \
            f"{what}: correct counts are not the per-class sums of image_correct"
        assert int(res.base_correct.sum()) == int(base_img.sum())

    # counts equal the naive per-class counts, up to near-tie images
    naive_counts = ref.class_counts(c)
    slack = per_class_counts(ties, ref.labels, c)
    diff = (res.correct.cpu().to(torch.int64) - naive_counts).abs()
    over = diff > slack
    if over.any():
        fi, ci = over.nonzero()[0].tolist()
        pytest.fail(f"{what}: filter {int(ref.filters[fi])} class {ci}: carfast correct {int(res.correct[fi, ci])}, "
                    f"naive {int(naive_counts[fi, ci])}, near ties there {int(slack[fi, ci])} "
                    f"({int(over.sum())} (filter, class) cells off)")

    # losses
    base_loss_sum = float(ref.base_loss.sum())
    assert res.base_loss_sum == pytest.approx(base_loss_sum, rel=1e-5, abs=1e-5), \
        f"{what}: base_loss_sum {res.base_loss_sum} != naive {base_loss_sum}"
    naive_inc = (ref.loss.sum(1) - ref.base_loss.sum()) / n
    got_inc = res.loss_increase.cpu().double()
    close = torch.isclose(got_inc, naive_inc, rtol=1e-4, atol=1e-6)
    if not close.all():
        fi = (~close).nonzero().flatten().tolist()
        pytest.fail(f"{what}: loss_increase differs from naive at filters {ref.filters[fi].tolist()[:8]}: "
                    f"carfast {got_inc[fi].tolist()[:8]}, naive {naive_inc[fi].tolist()[:8]}")


def _score(model, layer, data, **kw):
    return carfast.score_layer(model, layer, data, **kw)


# ---------------------------------------------------------------------------------------------------
# synthetic nets


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", SCORABLE)
def test_synthetic_image_by_image(name, backend):
    x, y, ref = synth_reference(name)
    case = NETS[name]()
    res = _score(case.model, case.layer, (x, y), backend=backend, per_image=True)
    assert res.method in METHODS, res.method
    if name == "untraceable":
        assert res.method == "full_network", res.method
    assert res.layer == case.layer
    assert_matches_naive(res, ref, what=f"{name} [{backend}, {res.method}]")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", SCORABLE)
def test_filter_subset_keeps_order(name, backend):
    x, y, ref = synth_reference(name)
    case = NETS[name]()
    res = _score(case.model, case.layer, (x, y), filters=[3, 0, 5], backend=backend, per_image=True)
    assert res.filters.tolist() == [3, 0, 5]
    assert_matches_naive(res, _subset(ref, [3, 0, 5]), what=f"{name} filters [3, 0, 5] [{backend}]")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", SCORABLE)
def test_dataloader_equals_tuple(name, backend):
    x, y, ref = synth_reference(name)
    case = NETS[name]()
    loader = DataLoader(TensorDataset(x, y), batch_size=7, shuffle=False)    # 200 = 28 * 7 + 4
    from_loader = _score(case.model, case.layer, loader, backend=backend, per_image=True)
    from_tuple = _score(NETS[name]().model, case.layer, (x, y), backend=backend, per_image=True)
    what = f"{name} DataLoader(batch_size=7) [{backend}]"
    assert_matches_naive(from_loader, ref, what=what)
    assert torch.equal(from_loader.image_correct, from_tuple.image_correct), what
    assert torch.equal(from_loader.base_image_correct, from_tuple.base_image_correct), what
    assert torch.equal(from_loader.correct, from_tuple.correct), what
    assert torch.equal(from_loader.base_correct, from_tuple.base_correct), what
    assert torch.equal(from_loader.class_totals, from_tuple.class_totals), what
    torch.testing.assert_close(from_loader.loss_sum.double(), from_tuple.loss_sum.double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", SCORABLE)
def test_small_memory_budget_same_counts(name, backend):
    x, y, ref = synth_reference(name)
    case = NETS[name]()
    default = _score(case.model, case.layer, (x, y), backend=backend)
    small = _score(NETS[name]().model, case.layer, (x, y), backend=backend, memory_budget=SMALL_BUDGET)
    what = f"{name} memory_budget={SMALL_BUDGET} [{backend}]"
    assert_matches_naive(small, ref, what=what, per_image=False)
    assert torch.equal(small.correct, default.correct), what
    assert torch.equal(small.base_correct, default.base_correct), what
    assert torch.equal(small.class_totals, default.class_totals), what
    torch.testing.assert_close(small.loss_sum.double(), default.loss_sum.double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["bn_after_act", "alexnet_head", "linear_target", "untraceable"])
def test_layer_given_as_module(name):
    x, y, ref = synth_reference(name)
    case = NETS[name]()
    res = _score(case.model, case.model.get_submodule(case.layer), (x, y), per_image=True)
    assert res.layer == case.layer
    assert_matches_naive(res, ref, what=f"{name} (layer given as a module)")


@pytest.mark.parametrize("name", SCORABLE)
def test_pair_accounting(name):
    """Every (filter, image) pair is either evaluated or skipped (activation all zero)."""
    x, y, ref = synth_reference(name)
    case = NETS[name]()
    res = _score(case.model, case.layer, (x, y))
    assert res.pairs_evaluated + res.pairs_skipped == len(ref.filters) * N_SYNTH, \
        (res.pairs_evaluated, res.pairs_skipped)


# ---------------------------------------------------------------------------------------------------
# the model is left exactly as it came


@pytest.mark.parametrize("name", SCORABLE)
def test_model_left_as_it_came(name):
    x, y, ref = synth_reference(name)
    case = NETS[name]()
    model = case.model
    model.train()                                    # scoring must use eval mode, and give train mode back
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    grads = {k: p.requires_grad for k, p in model.named_parameters()}
    calls = {"fwd": 0, "pre": 0}

    def fwd_hook(module, args, out):
        calls["fwd"] += 1

    def pre_hook(module, args):
        calls["pre"] += 1

    target = model.get_submodule(case.layer)
    consumer = model.get_submodule(next(iter(case.consumers)))
    h1 = target.register_forward_hook(fwd_hook)
    h2 = consumer.register_forward_pre_hook(pre_hook)
    h3 = model.register_forward_hook(fwd_hook)
    hooks = {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks))
             for n, m in model.named_modules()}

    res = _score(model, case.layer, (x, y), per_image=True)

    assert_matches_naive(res, ref, what=f"{name} (model in train mode before scoring)")
    assert all(m.training for m in model.modules()), \
        [n for n, m in model.named_modules() if not m.training]
    after = model.state_dict()
    assert list(after) == list(state)
    for k, v in state.items():
        assert after[k].dtype == v.dtype and after[k].device == v.device, k
        assert torch.equal(after[k], v), f"{name}: {k} changed by scoring"
    assert {k: p.requires_grad for k, p in model.named_parameters()} == grads
    now = {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks))
           for n, m in model.named_modules()}
    assert now == hooks, f"{name}: hooks changed by scoring"
    # the user's hooks still fire, once each per forward
    calls.update(fwd=0, pre=0)
    model.eval()
    with torch.no_grad():
        model(x[:4])
    assert calls == {"fwd": 2, "pre": 1}, calls
    h1.remove(), h2.remove(), h3.remove()


# ---------------------------------------------------------------------------------------------------
# refusals and the untraceable net


def test_residual_target_refused():
    case = NETS["residual_target"]()
    x, y = make_data(case, 50, seed=0)
    with pytest.raises(ValueError, match=r"(?i)residual|coupl"):
        _score(case.model, case.layer, (x, y))


@pytest.mark.parametrize("layer", ["layer1.0.conv2", "layer2.0.conv2", "conv1"])
def test_resnet_residual_layers_refused(layer):
    model = carfast.models.cifar_resnet(20)
    x, y = resnet_data()
    with pytest.raises(ValueError, match=r"(?i)residual|coupl"):
        _score(model, layer, (x[:50], y[:50]))


# ---------------------------------------------------------------------------------------------------
# ResNet-20 on real CIFAR-10 images


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layer", list(RESNET_LAYERS))
def test_resnet20_image_by_image(layer, backend):
    x, y, ref = resnet_reference(layer)
    model = carfast.models.cifar_resnet(20)
    res = _score(model, layer, (x, y), backend=backend, per_image=True)
    assert res.method in METHODS
    assert_matches_naive(res, ref, what=f"ResNet-20 {layer} [{backend}, {res.method}]")


@pytest.mark.slow
def test_resnet20_all_2000_images():
    layer = "layer1.0.conv1"
    x, y, ref = resnet_reference(layer, 2000)
    res = _score(carfast.models.cifar_resnet(20), layer, (x, y), per_image=True)
    assert_matches_naive(res, ref, what=f"ResNet-20 {layer}, 2000 images")


class _MeanHead(torch.nn.Module):
    """A ResNet-20 whose head is spelled another way: ``linear(x.mean((2, 3)))``, ``F.avg_pool2d`` + view, or
    ``adaptive_avg_pool2d`` + flatten."""

    def __init__(self, spelling: str):
        super().__init__()
        self.net, self.spelling = cifar_resnet(20), spelling

    def forward(self, x):
        n = self.net
        out = n.layer3(n.layer2(n.layer1(F.relu(n.bn1(n.conv1(x))))))
        if self.spelling == "mean":
            return n.linear(out.mean((2, 3)))
        if self.spelling == "avg_pool2d":
            return n.linear(F.avg_pool2d(out, out.size(3)).view(out.size(0), -1))
        return n.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


@pytest.mark.parametrize("spelling", ["mean", "avg_pool2d", "adaptive"])
def test_every_spelling_of_the_head_reaches_the_closed_form(spelling):
    """The method follows what the network computes: each spelling of the global average pool is affine."""
    model = _MeanHead(spelling).eval()
    x, y = cifar10_test(64)
    res = carfast.score_layer(model, "net.layer3.2.conv1", (x, y), per_image=True, progress=False)
    ref = carfast.score_layer(cifar_resnet(20), "layer3.2.conv1", (x, y), per_image=True, progress=False)
    assert res.method == "closed_form" and ref.method == "closed_form"
    assert torch.equal(res.image_correct, ref.image_correct)
