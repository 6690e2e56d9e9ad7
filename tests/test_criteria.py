"""Baseline criteria (carfast/criteria.py) against direct computations on small seeded nets."""
import copy

import pytest
import torch
import torch.nn.functional as F
from nets import NETS, make_data, randomize
from torch import nn

from carfast.criteria import CRITERIA, apoz, get_criterion, l1_norm, mean_activation, random_scores, taylor

DATA_CRITERIA = [mean_activation, apoz, taylor]


def _conv_net(seed=0):
    """target "0" -> BN -> ReLU -> MaxPool -> consumer "4" (a conv) -> ... ; prefix = net[:4]."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 5))
    return randomize(net, seed), 4


def _flatten_net(seed=0):
    """target "0" -> ReLU -> flatten -> consumer "3" (a Linear, 16 features per filter); prefix = net[:3]."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 5, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                        nn.Linear(5 * 4 * 4, 7), nn.ReLU(), nn.Linear(7, 4))
    return randomize(net, seed), 3


def _data(n=37, classes=5, seed=1, hw=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, hw, hw, generator=g), torch.randint(0, classes, (n,), generator=g)


def _direct(net, cut, x, y, width=1):
    """Direct (mean, 1 - apoz, taylor) at net[cut]'s input, from net[:cut] and autograd through net[cut:]."""
    net = copy.deepcopy(net).eval()
    with torch.no_grad():
        act = net[:cut](x)
    a = act.reshape(x.shape[0], act.shape[1] // width, -1).double()
    mean, nonzero = a.mean((0, 2)), 1 - (a == 0).double().mean((0, 2))
    leaf = act.detach().requires_grad_(True)
    loss = F.cross_entropy(net[cut:](leaf), y, reduction="sum")
    (g,) = torch.autograd.grad(loss, [leaf])
    g = g.reshape(a.shape).double()
    return mean, nonzero, (a * g).mean(2).abs().mean(0)


@pytest.mark.parametrize("make", [_conv_net, _flatten_net])
def test_data_criteria_equal_direct_computation(make):
    net, cut = make()
    x, y = _data(classes=net[-1].out_features, hw=16 if make is _conv_net else 8)
    width = 16 if make is _flatten_net else 1
    mean, nonzero, tay = _direct(net, cut, x, y, width)
    assert 0 < float(nonzero.min()) and float(nonzero.max()) < 1, "the test needs some zeros, not all"
    torch.testing.assert_close(mean_activation(net, "0", (x, y), batch_size=10), mean, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(apoz(net, "0", (x, y), batch_size=10), nonzero, rtol=0, atol=1e-12)
    torch.testing.assert_close(taylor(net, "0", (x, y), batch_size=10), tay, rtol=1e-4, atol=1e-9)


def test_shape_dtype_and_linear_target():
    net, _ = _flatten_net()
    x, y = _data(classes=4)
    for fn in [random_scores, l1_norm, *DATA_CRITERIA]:
        for layer, num in [("0", 5), ("3", 7)]:
            s = fn(net, layer, (x, y))
            assert s.shape == (num,) and s.dtype == torch.float64 and bool(torch.isfinite(s).all()), fn.__name__
    # Linear target "3": consumer "5" reads ReLU(fc3) directly
    with torch.no_grad():
        h = F.relu(net[:4](x)).double()
    torch.testing.assert_close(mean_activation(net, net[3], (x, y)), h.mean(0), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(apoz(net, "3", (x, y)), 1 - (h == 0).double().mean(0))


def test_l1_is_sum_of_absolute_weights_and_random_is_seeded():
    net, _ = _conv_net()
    w = net[0].weight.detach().double()
    torch.testing.assert_close(l1_norm(net, "0"), w.abs().sum((1, 2, 3)))
    torch.testing.assert_close(l1_norm(net, "8"), net[8].weight.detach().double().abs().sum(1))
    r = random_scores(net, "0", seed=3)
    assert torch.equal(r, random_scores(net, "0", None, seed=3))
    assert not torch.equal(r, random_scores(net, "0", seed=4))
    assert r.shape == (6,) and float(r.min()) >= 0 and float(r.max()) < 1


@pytest.mark.parametrize("fn", DATA_CRITERIA, ids=lambda f: f.__name__)
def test_batching_does_not_change_the_result(fn):
    net, _ = _conv_net()
    x, y = _data(classes=5, hw=16)
    whole = fn(net, "0", (x, y))
    uneven = [(x[:5], y[:5]), (x[5:6], y[5:6]), (x[6:], y[6:])]
    torch.testing.assert_close(fn(net, "0", uneven, batch_size=7), whole, rtol=1e-6, atol=1e-10)
    assert torch.equal(fn(net, "0", (x, y)), whole)   # deterministic


@pytest.mark.parametrize("fn", [random_scores, l1_norm, *DATA_CRITERIA], ids=lambda f: f.__name__)
def test_model_unchanged(fn):
    net, _ = _conv_net()
    net.train()
    net[1].eval()                       # a mixed flag, to see each module's own flag restored
    flags = [m.training for m in net.modules()]
    state = copy.deepcopy(net.state_dict())
    x, y = _data(classes=5, hw=16)
    fn(net, "0", (x, y))
    assert [m.training for m in net.modules()] == flags
    assert all(p.grad is None for p in net.parameters())
    assert all(p.requires_grad for p in net.parameters())
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in net.modules())
    after = net.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)   # BN running stats untouched (eval mode)


@pytest.mark.parametrize("name", ["two_consumers", "untraceable", "mobilenet_chain_mult2", "alexnet_head"])
def test_synthetic_nets_against_hooks(name):
    """Several consumers (combined as documented), fx-untraceable nets, depthwise multiplier, flatten."""
    case = NETS[name]()
    x, y = make_data(case, 24)
    mods = dict(case.model.named_modules())
    num = mods[case.layer].out_channels
    work = copy.deepcopy(case.model).eval().requires_grad_(False)
    wmods = dict(work.named_modules())
    seen = {}

    def grab(cname, width):
        def hook(_m, args):
            leaf = args[0].detach().requires_grad_(True)
            seen[cname] = (leaf, width)
            return (leaf,)
        return hook

    handles = [wmods[c].register_forward_pre_hook(grab(c, w)) for c, w in case.consumers.items()]
    with torch.enable_grad():
        loss = F.cross_entropy(work(x), y, reduction="sum")
    for h in handles:
        h.remove()
    leaves = [seen[c][0] for c in case.consumers]
    grads = torch.autograd.grad(loss, leaves)
    means, zeros, tay = [], [], 0
    for (leaf, _width), g in zip([seen[c] for c in case.consumers], grads):
        a = leaf.detach().double().reshape(x.shape[0], num, -1)
        means.append(a.mean((0, 2)))
        zeros.append((a == 0).double().mean((0, 2)))
        tay = tay + (a * g.double().reshape(a.shape)).mean(2)
    torch.testing.assert_close(mean_activation(case.model, case.layer, (x, y)), torch.stack(means).mean(0))
    torch.testing.assert_close(apoz(case.model, case.layer, (x, y)), 1 - torch.stack(zeros).mean(0))
    torch.testing.assert_close(taylor(case.model, case.layer, (x, y)), tay.abs().mean(0), rtol=1e-4, atol=1e-9)


def test_real_resnet_layer():
    from carfast.data import cifar10_test
    from carfast.models import cifar_resnet
    model = cifar_resnet(20)
    x, y = cifar10_test(64)
    for name in CRITERIA:
        s = get_criterion(name)(model, "layer1.0.conv1", (x, y))
        assert s.shape == (16,) and s.dtype == torch.float64 and bool(torch.isfinite(s).all()), name
    ap = apoz(model, "layer1.0.conv1", (x, y))
    assert float(ap.min()) >= 0 and float(ap.max()) <= 1 and float(ap.min()) < 1   # ReLU: some zeros


def test_bad_inputs():
    net, _ = _conv_net()
    x, y = _data(classes=5, hw=16)
    with pytest.raises(ValueError, match=r"mean_activation: layer '00' not found.*did you mean"):
        mean_activation(net, "00", (x, y))
    with pytest.raises(TypeError, match=r"apoz: layer '1' is a BatchNorm2d"):
        apoz(net, "1", (x, y))
    with pytest.raises(TypeError, match=r"l1_norm: model must be a torch.nn.Module"):
        l1_norm("net", "0")
    with pytest.raises(TypeError, match="taylor: data must be .* single tensor"):
        taylor(net, "0", x)
    with pytest.raises(ValueError, match="mean_activation: data holds no images"):
        mean_activation(net, "0", [])
    with pytest.raises(ValueError, match="taylor: label 9 is outside"):
        taylor(net, "0", (x, torch.full_like(y, 9)))
    with pytest.raises(ValueError, match="apoz: batch_size must be a positive int"):
        apoz(net, "0", (x, y), batch_size=0)
    with pytest.raises(TypeError, match="random_scores: seed must be an int"):
        random_scores(net, "0", seed=1.5)
    shared = nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU())
    twice = nn.Sequential(shared, shared, nn.Flatten(), nn.LazyLinear(3))   # a layer called twice
    twice(x[:1, :, :2, :2])
    with pytest.raises(ValueError, match=r"mean_activation: layer '0.0' is called 2 times"):
        mean_activation(twice, "0.0", (x[:4, :, :2, :2], y[:4] % 3))
    small = (x[:4, :, :2, :2], y[:4] % 3)
    assert l1_norm(twice, "0.0", small).shape == (3,)    # weight-only criteria score any layer per filter
    with pytest.raises(ValueError, match=r"l1_norm: cannot infer an input for Sequential .* pass data"):
        l1_norm(twice, "0.0")


def test_coupled_layer_is_scored_per_channel_of_its_group():
    """block.conv2's channels enter a residual add with the stem's: the criteria score the group's
    channels, read where the stream is read (block.conv1's input and the classifier's, after pooling)."""
    case = NETS["residual_target"]()
    model, (x, y) = case.model, make_data(case, 24)
    work = copy.deepcopy(model).eval()
    seen = {}
    handles = [m.register_forward_pre_hook(lambda m, a, k=k: seen.__setitem__(k, a[0].detach().double()))
               for k, m in (("conv1", work.block.conv1), ("fc", work.fc))]
    with torch.no_grad():
        work(x)
    for h in handles:
        h.remove()
    means = [seen["conv1"].mean((0, 2, 3)), seen["fc"].mean(0)]
    zeros = [(seen["conv1"] == 0).double().mean((0, 2, 3)), (seen["fc"] == 0).double().mean(0)]
    torch.testing.assert_close(mean_activation(model, case.layer, (x, y)), torch.stack(means).mean(0))
    torch.testing.assert_close(apoz(model, case.layer, (x, y)), 1 - torch.stack(zeros).mean(0))
    rows = lambda m: m.weight.detach().double().abs().flatten(1).sum(1)   # noqa: E731
    torch.testing.assert_close(l1_norm(model, case.layer, (x, y)), rows(model.stem) + rows(model.block.conv2))
    torch.testing.assert_close(l1_norm(model, "stem"), l1_norm(model, case.layer))   # one group, named by any layer
    assert random_scores(model, case.layer).shape == (8,)
    tay = taylor(model, case.layer, (x, y))
    assert tay.shape == (8,) and bool((tay > 0).all())


def test_get_criterion():
    assert get_criterion("taylor") is taylor and get_criterion("l1") is l1_norm
    assert set(CRITERIA) == {"random", "l1", "mean_activation", "apoz", "taylor"}
    own = lambda model, layer, data: torch.zeros(1)   # noqa: E731
    assert get_criterion(own) is own
    with pytest.raises(ValueError, match=r"unknown criterion 'L1'.*'random', 'l1', 'mean_activation'"):
        get_criterion("L1")
    with pytest.raises(TypeError, match="get_criterion: expected a criterion name"):
        get_criterion(3)
