"""Make the oracle trustworthy, independently of carfast.

The naive reference (tests/naive.py) removes filter k by zeroing what k owns in each consumer's input.
Here we check that this equals PHYSICAL deletion: a copy of the network built by hand, with plain
tensor slicing of weights, in which the filter is gone from the target, from its BN / depthwise conv
entries and from the consumers' inputs (the whole H*W feature block of a Linear after flatten). We also
check that zeroing the target's OUTPUT instead is different (so the distinction matters), and that the
naive reference leaves the model as it found it.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from naive import naive_logits, naive_scores, near_tie, per_class_counts
from nets import NETS, SCORABLE, make_data
from torch import nn

# ---------------------------------------------------------------------------------------------------
# physical deletion, by hand


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _keep(n: int, first: int, last: int) -> torch.Tensor:
    return torch.tensor([i for i in range(n) if not first <= i < last], dtype=torch.long)


def _drop_out(m: nn.Module, first: int, last: int) -> nn.Module:
    """Remove output channels / features [first, last) of a (groups=1) Conv2d or a Linear."""
    keep = _keep(m.weight.shape[0], first, last)
    if isinstance(m, nn.Linear):
        new = nn.Linear(m.in_features, len(keep), bias=m.bias is not None)
    else:
        assert m.groups == 1
        new = nn.Conv2d(m.in_channels, len(keep), m.kernel_size, m.stride, m.padding, m.dilation,
                        bias=m.bias is not None)
    with torch.no_grad():
        new.weight.copy_(m.weight[keep])
        if m.bias is not None:
            new.bias.copy_(m.bias[keep])
    return new


def _drop_bn(m: nn.Module, first: int, last: int) -> nn.Module:
    keep = _keep(m.num_features, first, last)
    new = type(m)(len(keep), eps=m.eps, momentum=m.momentum)
    with torch.no_grad():
        new.weight.copy_(m.weight[keep])
        new.bias.copy_(m.bias[keep])
        new.running_mean.copy_(m.running_mean[keep])
        new.running_var.copy_(m.running_var[keep])
        new.num_batches_tracked.copy_(m.num_batches_tracked)
    return new


def _drop_depthwise(m: nn.Conv2d, k: int) -> nn.Conv2d:
    """Remove input channel k of a depthwise conv (groups == in_channels) and its multiplier outputs."""
    c = m.in_channels
    assert m.groups == c
    mult = m.out_channels // c
    keep = _keep(m.out_channels, k * mult, (k + 1) * mult)
    new = nn.Conv2d(c - 1, (c - 1) * mult, m.kernel_size, m.stride, m.padding, m.dilation, groups=c - 1,
                    bias=m.bias is not None)
    with torch.no_grad():
        new.weight.copy_(m.weight[keep])
        if m.bias is not None:
            new.bias.copy_(m.bias[keep])
    return new


class _UnevenGroupedConv(nn.Module):
    """A grouped conv whose groups have different numbers of input channels (one group lost one)."""

    def __init__(self, m: nn.Conv2d, first: int, last: int):
        super().__init__()
        self.stride, self.padding, self.dilation = m.stride, m.padding, m.dilation
        in_per_group, out_per_group = m.in_channels // m.groups, m.out_channels // m.groups
        self.sizes, weights = [], []
        for g in range(m.groups):
            rows = slice(g * out_per_group, (g + 1) * out_per_group)
            keep_local = [i for i in range(in_per_group) if not first <= g * in_per_group + i < last]
            self.sizes.append(len(keep_local))
            weights.append(nn.Parameter(m.weight[rows][:, keep_local].detach().clone()))
        self.weights = nn.ParameterList(weights)
        self.bias = None if m.bias is None else nn.Parameter(m.bias.detach().clone())

    def forward(self, x):
        parts = torch.split(x, self.sizes, dim=1)
        out = torch.cat([F.conv2d(p, w, None, self.stride, self.padding, self.dilation)
                         for p, w in zip(parts, self.weights)], dim=1)
        return out if self.bias is None else out + self.bias.view(1, -1, 1, 1)


def _drop_in(m: nn.Module, first: int, last: int) -> nn.Module:
    """Remove input channels / features [first, last) of a consumer Conv2d or Linear."""
    if isinstance(m, nn.Conv2d) and m.groups > 1:
        return _UnevenGroupedConv(m, first, last)
    keep = _keep(m.weight.shape[1], first, last)
    if isinstance(m, nn.Linear):
        new = nn.Linear(len(keep), m.out_features, bias=m.bias is not None)
    else:
        new = nn.Conv2d(len(keep), m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                        bias=m.bias is not None)
    with torch.no_grad():
        new.weight.copy_(m.weight[:, keep])
        if m.bias is not None:
            new.bias.copy_(m.bias)
    return new


# what to cut, per net: ("out", target), ("bn", name, width), ("dw", name), ("in", consumer, width)
PHYSICAL = {
    "bn_after_act": [("out", "conv1"), ("bn", "bn1", 1), ("in", "conv2", 1)],
    "alexnet_head": [("out", "features.3"), ("in", "classifier.2", 16)],
    "mobilenet_chain": [("out", "expand"), ("bn", "expand_bn", 1), ("dw", "dw"), ("bn", "dw_bn", 1),
                        ("in", "project", 1)],
    "mobilenet_chain_mult2": [("out", "expand"), ("bn", "expand_bn", 1), ("dw", "dw"), ("bn", "dw_bn", 2),
                              ("in", "project", 2)],
    "two_consumers": [("out", "conv"), ("bn", "bn", 1), ("in", "conv_a", 1), ("in", "conv_b", 1)],
    "linear_target": [("out", "fc2"), ("in", "fc3", 1)],
    "linear_bn_target": [("out", "fc2"), ("bn", "bn2", 1), ("in", "fc3", 1)],
    "conv_bias": [("out", "conv2"), ("in", "conv3", 1)],
    "nonzero_act": [("out", "conv"), ("bn", "bn", 1), ("in", "consumer", 1)],
    "classifier_consumer": [("out", "conv"), ("bn", "bn", 1), ("in", "fc", 1)],
    "functional_ops": [("out", "conv2"), ("in", "fc1", 16)],
    "functional_conv": [("out", "conv2"), ("bn", "bn2", 1), ("in", "conv3", 1)],
    "grouped_consumer": [("out", "conv"), ("bn", "bn", 1), ("in", "gconv", 1)],
    "untraceable": [("out", "conv"), ("bn", "bn", 1), ("in", "consumer", 1)],
}


def physically_deleted(model: nn.Module, cuts, k: int) -> nn.Module:
    new = copy.deepcopy(model)
    for cut in cuts:
        kind, name = cut[0], cut[1]
        m = new.get_submodule(name)
        if kind == "out":
            _set(new, name, _drop_out(m, k, k + 1))
        elif kind == "bn":
            w = cut[2]
            _set(new, name, _drop_bn(m, k * w, (k + 1) * w))
        elif kind == "dw":
            _set(new, name, _drop_depthwise(m, k))
        elif kind == "in":
            w = cut[2]
            _set(new, name, _drop_in(m, k * w, (k + 1) * w))
        else:
            raise AssertionError(kind)
    return new.eval()


def _num_filters(model: nn.Module, layer: str) -> int:
    m = model.get_submodule(layer)
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def _assert_logits_close(actual, expected):
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale)


# ---------------------------------------------------------------------------------------------------
# tests


def test_physical_table_covers_every_scorable_net():
    assert set(PHYSICAL) == set(SCORABLE)


@pytest.mark.parametrize("name", sorted(PHYSICAL))
def test_naive_equals_physical_deletion(name):
    case = NETS[name]()
    x, y = make_data(case, 64, seed=1)
    k_all = _num_filters(case.model, case.layer)
    filters = sorted({0, k_all // 2, k_all - 1})
    res = naive_scores(case.model, case.consumers, x, y, filters, batch_size=25)
    changed = 0
    for i, k in enumerate(filters):
        phys = physically_deleted(case.model, PHYSICAL[name], k)
        # the physical copy really is smaller
        assert _num_filters(phys, case.layer) == k_all - 1
        with torch.no_grad():
            expected = phys(x)
        _assert_logits_close(res.logits[i], expected)
        changed += bool((res.logits[i] - res.base_logits).abs().max() > 1e-4)
    # the removal matters for some filter on this data (else the comparison would be vacuous; some
    # filters are dead on every image, e.g. in linear_target, and removing them changes nothing)
    assert changed >= 1
    with torch.no_grad():
        _assert_logits_close(res.base_logits, case.model(x))


def test_naive_equals_physical_deletion_resnet20():
    models = pytest.importorskip("carfast.models")
    data = pytest.importorskip("carfast.data")
    model = models.cifar_resnet(20)
    x, y = data.cifar10_test(n=64)
    for layer, consumer in [("layer1.0.conv1", "layer1.0.conv2"), ("layer3.2.conv1", "layer3.2.conv2")]:
        bn = layer.rsplit(".", 1)[0] + ".bn1"
        cuts = [("out", layer), ("bn", bn, 1), ("in", consumer, 1)]
        res = naive_scores(model, {consumer: 1}, x, y, [0, 5])
        for i, k in enumerate([0, 5]):
            phys = physically_deleted(model, cuts, k)
            with torch.no_grad():
                _assert_logits_close(res.logits[i], phys(x))


def _zero_target_output_logits(model, layer, x, k):
    def hook(module, args, out):
        out = out.clone()
        out[:, k] = 0
        return out
    h = model.get_submodule(layer).register_forward_hook(hook)
    try:
        with torch.no_grad():
            return model(x)
    finally:
        h.remove()


@pytest.mark.parametrize("name", ["bn_after_act", "mobilenet_chain", "mobilenet_chain_mult2", "nonzero_act",
                                  "linear_bn_target"])
def test_zeroing_target_output_is_not_removal(name):
    """Zeroing the target's output channel differs from removing the filter (BN shift after it, f(0) != 0,
    the depthwise conv's BN), so an implementation that does that must fail the exactness tests."""
    case = NETS[name]()
    x, y = make_data(case, 128, seed=2)
    k_all = _num_filters(case.model, case.layer)
    res = naive_scores(case.model, case.consumers, x, y, range(k_all))
    differs, count_differs = 0, 0
    for k in range(k_all):
        zeroed = _zero_target_output_logits(case.model, case.layer, x, k)
        if (zeroed - res.logits[k]).abs().max() > 1e-3:
            differs += 1
        if int(((zeroed.argmax(1) == y)).sum()) != int(res.correct[k].sum()):
            count_differs += 1
    # BN right after the activation shifts every zeroed channel; elsewhere the activation may clip it
    need = k_all if name == "bn_after_act" else 1
    assert differs >= need, f"{name}: zeroing the output differs from removal for only {differs}/{k_all}"
    assert count_differs >= 1, f"{name}: zeroing the output never changes an accuracy count"


@pytest.mark.parametrize("name", ["alexnet_head", "mobilenet_chain_mult2", "grouped_consumer"])
def test_naive_leaves_model_unchanged(name):
    case = NETS[name]()
    model = case.model
    x, y = make_data(case, 40, seed=3)
    model.train()
    model.get_submodule(case.layer).eval()          # a mixed pattern of flags, restored exactly
    flags = {n: m.training for n, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    user_pre = model.get_submodule(next(iter(case.consumers))).register_forward_pre_hook(
        lambda m, a: calls.append("pre"))
    user_fwd = model.get_submodule(case.layer).register_forward_hook(lambda m, a, o: calls.append("fwd"))
    hooks_before = {n: (dict(m._forward_pre_hooks), dict(m._forward_hooks)) for n, m in model.named_modules()}

    res = naive_scores(model, case.consumers, x, y, [0, 1, 2], batch_size=16)

    assert {n: m.training for n, m in model.named_modules()} == flags
    after = model.state_dict()
    assert after.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(after[k], v), k
    assert {n: (dict(m._forward_pre_hooks), dict(m._forward_hooks)) for n, m in model.named_modules()} \
        == hooks_before
    # results were computed in eval mode (dropout off, BN running stats): equal to a plain eval run
    model.eval()
    with torch.no_grad():
        _assert_logits_close(res.base_logits, model(x))
    user_pre.remove()
    user_fwd.remove()


def test_naive_logits_helper_matches_scores():
    case = NETS["two_consumers"]()
    x, y = make_data(case, 30, seed=4)
    res = naive_scores(case.model, case.consumers, x, y, [4, 1])
    torch.testing.assert_close(naive_logits(case.model, case.consumers, x, 4), res.logits[0], rtol=0, atol=0)
    torch.testing.assert_close(naive_logits(case.model, case.consumers, x, 1), res.logits[1], rtol=0, atol=0)
    assert res.filters.tolist() == [4, 1]


def test_near_tie_and_counts():
    logits = torch.tensor([[1.0, 1.0 - 1e-7, 0.0], [3.0, 1.0, 0.0], [200.0, 200.0 - 1e-4, 0.0]])
    margin = torch.tensor([1e-7, 2.0, 1e-4])
    assert near_tie(margin, logits).tolist() == [True, False, True]
    correct = torch.tensor([[True, False, True, True], [False, False, True, False]])
    labels = torch.tensor([0, 0, 2, 1])
    assert per_class_counts(correct, labels, 3).tolist() == [[1, 1, 1], [0, 0, 1]]


def test_make_data_labels_are_mostly_the_model_predictions():
    for name in NETS:
        case = NETS[name]()
        x, y = make_data(case, 200, seed=0)
        x2, y2 = make_data(NETS[name](), 200, seed=0)
        assert torch.equal(x, x2) and torch.equal(y, y2)               # seeded
        with torch.no_grad():
            pred = case.model(x).argmax(1)
        agree = float((pred == y).float().mean())
        assert 0.6 < agree < 0.85, (name, agree)
        assert len(torch.unique(pred)) >= 5, (name, torch.bincount(pred))   # not a constant classifier


def test_untraceable_is_untraceable():
    import torch.fx
    case = NETS["untraceable"]()
    with pytest.raises((torch.fx.proxy.TraceError, TypeError)):     # a Proxy used as an int
        torch.fx.symbolic_trace(case.model)
