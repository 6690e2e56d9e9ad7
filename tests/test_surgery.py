"""Physical filter removal equals the masked network; pruned models save/load as plain data; params/MACs.

The reference for surgery is the naive one (tests/naive.py): zero the removed channels at each
consumer's input with a forward pre-hook and run the intact network. Consumers and widths come from
the hand-written ``NetCase.consumers``, not from carfast's graph code.
"""
import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from nets import NETS, SCORABLE, make_data
from torch import fx, nn

from carfast.data import cifar10_test
from carfast.models import cifar_resnet
from carfast.surgery import remove_filters
from carfast.surgery.measure import ModelStats, count_macs, count_params, latency
from carfast.surgery.pruned_io import load_pruned_model, save_pruned

TESTS = os.path.dirname(os.path.abspath(__file__))


def masked_logits(model, masks, x):
    """Logits of ``model`` (eval) with input indices ``masks[consumer]`` of each consumer zeroed."""
    modules = dict(model.named_modules())
    flags = {n: m.training for n, m in modules.items()}

    def hook(idx):
        return lambda _m, args: (args[0].clone().index_fill_(1, idx, 0),) + tuple(args[1:])

    handles = [modules[n].register_forward_pre_hook(hook(torch.tensor(sorted(i)))) for n, i in masks.items()]
    try:
        model.eval()
        with torch.no_grad():
            return model(x)
    finally:
        for h in handles:
            h.remove()
        for n, m in modules.items():
            m.training = flags[n]


def owned(filters, width):
    return {k * width + j for k in filters for j in range(width)}


def assert_close_logits(out, ref, rel=1e-5):
    scale = max(1.0, ref.abs().max().item())
    err = (out - ref).abs()
    bad = err > rel * scale
    assert not bad.any(), (f"{int(bad.sum())} of {err.numel()} logits differ by more than {rel} x {scale:.3g}; "
                           f"first at {bad.nonzero()[0].tolist()}: {out[bad][0].item()} vs {ref[bad][0].item()}")


def state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def seeded_subset(n, k, seed):
    return sorted(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].tolist())


def num_filters(m):
    return m.out_channels if isinstance(m, nn.Conv2d) else m.out_features


# ---------------------------------------------------------------------------------------------------
# surgery == masked network


def test_resnet56_half_of_every_conv1_matches_masked_and_shrinks_exactly():
    model = cifar_resnet(56)
    x, _ = cifar10_test(64)
    before = copy.deepcopy(model.state_dict())
    modules = dict(model.named_modules())
    removals = {n: seeded_subset(m.out_channels, m.out_channels // 2, i)
                for i, (n, m) in enumerate(modules.items()) if n.startswith("layer") and n.endswith("conv1")}
    assert len(removals) == 27
    pruned = remove_filters(model, removals)

    masks = {n.replace("conv1", "conv2"): set(r) for n, r in removals.items()}
    ref = masked_logits(model, masks, x)
    with torch.no_grad():
        out, intact = pruned(x), model(x[:16])
    assert_close_logits(out, ref)
    assert (intact - ref[:16]).abs().max() > 1e-2     # the removal changes the network: the test is not vacuous
    assert state_equal(model.state_dict(), before)     # the input model is untouched
    assert modules["layer1.0.conv1"].out_channels == 16 and model.layer3[8].conv2.in_channels == 64

    # parameters and MACs drop exactly as the arithmetic says: conv1 rows, bn1 affine, conv2 columns
    p_drop = m_drop = 0
    for n, r in removals.items():
        c1, c2 = modules[n], modules[n.replace("conv1", "conv2")]
        hw = {"layer1": 32 * 32, "layer2": 16 * 16, "layer3": 8 * 8}[n.split(".")[0]]
        p_drop += len(r) * c1.in_channels * 9 + 2 * len(r) + c2.out_channels * len(r) * 9
        m_drop += hw * (len(r) * c1.in_channels * 9 + c2.out_channels * len(r) * 9)
        pc1, pbn, pc2 = (pruned.get_submodule(n.replace("conv1", s)) for s in ("conv1", "bn1", "conv2"))
        keep = c1.out_channels - len(r)
        assert pc1.out_channels == pc1.weight.shape[0] == pbn.num_features == pbn.running_var.numel() == keep
        assert pc2.in_channels == pc2.weight.shape[1] == keep
    assert count_params(model) - count_params(pruned) == p_drop
    assert count_macs(model, x[:1]) - count_macs(pruned, x[:1]) == m_drop
    assert pruned.carfast_arch == model.carfast_arch


def _removal(case, seed=0):
    layer = case.model.get_submodule(case.layer)
    n = num_filters(layer)
    if case.name == "grouped_consumer":        # consumer has groups=2 over 6 + 6 channels: 2 from each group
        return [1, 4, 7, 10]
    return seeded_subset(n, max(1, n // 3), seed)


@pytest.mark.parametrize("name", SCORABLE)
def test_synthetic_nets_match_masked(name):
    case = NETS[name]()
    x, _ = make_data(case, 48)
    removed = _removal(case)
    pruned = remove_filters(case.model, {case.layer: removed}, example=x[:1])
    ref = masked_logits(case.model, {c: owned(removed, w) for c, w in case.consumers.items()}, x)
    with torch.no_grad():
        out, intact = pruned(x), case.model(x)
    assert_close_logits(out, ref)
    assert (intact - ref).abs().max() > 1e-4
    target = pruned.get_submodule(case.layer)
    assert num_filters(target) == num_filters(case.model.get_submodule(case.layer)) - len(removed)
    for c, w in case.consumers.items():
        old, new = case.model.get_submodule(c), pruned.get_submodule(c)
        old_in, new_in = (old.in_channels, new.in_channels) if isinstance(old, nn.Conv2d) else \
            (old.in_features, new.in_features)
        assert old_in - new_in == len(removed) * w


@pytest.mark.parametrize("name", ["untraceable", "bn_after_act", "alexnet_head"])
def test_example_is_inferred(name):
    case = NETS[name]()
    x, _ = make_data(case, 16)
    removed = _removal(case)
    a = remove_filters(case.model, {case.layer: removed})
    b = remove_filters(case.model, {case.layer: removed}, example=x[:1])
    assert state_equal(a.state_dict(), b.state_dict())


@pytest.mark.parametrize("name, removed, drop", [
    # expand 8->12 (no bias), expand_bn, depthwise 12 groups x2 3x3 with bias, dw_bn (24), project 24->10
    ("mobilenet_chain_mult2", [0, 5, 11], 3 * 8 + 2 * 3 + 6 * 9 + 6 + 2 * 6 + 10 * 6),
    # features.3: conv 8->12 3x3 with bias; classifier.2: Linear(12*16 -> 32), 16 features per channel
    ("alexnet_head", [2, 3, 9], 3 * (8 * 9 + 1) + 32 * 16 * 3),
    # conv 8->12 3x3; bn; gconv 12->16 groups 2 (8 outputs per group, one column of 9 per removed input)
    ("grouped_consumer", [1, 4, 7, 10], 4 * 8 * 9 + 2 * 4 + 16 * 2 * 9),
    # fc2 32->24 with bias; bn2 (BatchNorm1d); fc3 24->16
    ("linear_bn_target", [0, 1, 23], 3 * 33 + 2 * 3 + 16 * 3),
])
def test_param_drop_arithmetic(name, removed, drop):
    case = NETS[name]()
    x, _ = make_data(case, 4)
    pruned = remove_filters(case.model, {case.layer: removed}, example=x[:1])
    assert count_params(case.model) - count_params(pruned) == drop


def test_several_layers_in_one_call_index_the_model_as_passed():
    case = NETS["conv_bias"]()                       # conv1 -> conv2 -> conv3 -> conv4 -> fc
    x, _ = make_data(case, 32)
    m = case.model
    removals = {"conv1": [0, 7], m.conv2: [1, 2, 9], "conv3": [11]}     # conv4 -> mean: not followed
    pruned = remove_filters(m, removals, example=x[:1])
    masks = {"conv2": {0, 7}, "conv3": {1, 2, 9}, "conv4": {11}}
    assert_close_logits(pruned(x).detach(), masked_logits(m, masks, x))
    assert (pruned.conv2.in_channels, pruned.conv2.out_channels, pruned.conv4.in_channels) == (6, 7, 11)

    case = NETS["mobilenet_chain_mult2"]()           # stem feeds expand, expand's chain runs through dw
    x, _ = make_data(case, 32)
    pruned = remove_filters(case.model, {"stem": [3], "expand": [0, 5, 11]}, example=x[:1])
    masks = {"expand": {3}, "project": owned([0, 5, 11], 2)}
    assert_close_logits(pruned(x).detach(), masked_logits(case.model, masks, x))


def test_depthwise_target_with_multiplier():
    case = NETS["mobilenet_chain_mult2"]()           # dw: 12 groups, 2 outputs each; remove one per group
    x, _ = make_data(case, 32)
    removed = list(range(1, 24, 2))
    pruned = remove_filters(case.model, {"dw": removed}, example=x[:1])
    assert (pruned.dw.groups, pruned.dw.in_channels, pruned.dw.out_channels) == (12, 12, 12)
    assert_close_logits(pruned(x).detach(), masked_logits(case.model, {"project": set(removed)}, x))
    with pytest.raises(ValueError, match="inputs but no outputs"):
        remove_filters(case.model, {"dw": [0, 1]}, example=x[:1])


def test_input_model_untouched_in_train_mode():
    case = NETS["mobilenet_chain"]()
    m = case.model.train()
    m.fc.eval()
    flags = {n: mod.training for n, mod in m.named_modules()}
    before = copy.deepcopy(m.state_dict())
    x, _ = make_data(case, 4)
    pruned = remove_filters(m, {"expand": [1, 2]}, example=x[:1])
    assert state_equal(m.state_dict(), before)           # BN statistics not updated by the analysis
    assert {n: mod.training for n, mod in m.named_modules()} == flags
    assert {n: mod.training for n, mod in pruned.named_modules()} == flags
    assert m.expand.out_channels == 12 and pruned.expand.out_channels == 10
    assert state_equal(remove_filters(m, {"expand": []}).state_dict(), before)


class SharedConsumer(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.shared(F.relu(self.shared(F.relu(self.conv(x)))))
        return self.fc(x.mean(dim=(2, 3)))


class TiedMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3, self.out = nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 3)
        self.l3.weight = self.l2.weight

    def forward(self, x):
        return self.out(F.relu(self.l3(F.relu(self.l2(F.relu(self.l1(x)))))))


class HardCodedView(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 10, 3, padding=1)
        self.fc = nn.Linear(10 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.conv(x)), 4).view(-1, 160))


class LinearFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12 * 3 * 3, 10)           # registered first, runs last
        self.conv = nn.Conv2d(3, 12, 3, padding=1)

    def forward(self, x):
        return self.fc(self.conv(x).flatten(1))


@pytest.mark.parametrize("make, removals, error, match", [
    (lambda: NETS["bn_after_act"]().model, {"conv11": [0]}, ValueError, "not found.*did you mean 'conv1'"),
    (lambda: NETS["bn_after_act"]().model, {"conv1": [10]}, ValueError, r"out of range.*10 filters"),
    (lambda: NETS["bn_after_act"]().model, {"conv1": [-1]}, ValueError, "out of range"),
    (lambda: NETS["bn_after_act"]().model, {"conv1": [2, 2]}, ValueError, "more than once"),
    (lambda: NETS["bn_after_act"]().model, {"conv1": range(10)}, ValueError, "all 10 filters"),
    (lambda: NETS["bn_after_act"]().model, {"conv1": [1.0]}, TypeError, "must be ints"),
    (lambda: NETS["bn_after_act"]().model, {"conv1": "1"}, TypeError, "iterable of ints"),
    (lambda: NETS["bn_after_act"]().model, {"bn1": [1]}, TypeError, "BatchNorm2d"),
    (lambda: NETS["bn_after_act"]().model, [("conv1", [1])], TypeError, "must be a dict"),
    (lambda: NETS["bn_after_act"]().model, {"fc": [1]}, ValueError, "produces the model's outputs"),
    (lambda: NETS["residual_target"]().model, {"block.conv2": [1]}, ValueError, "remove_filters: .*residual add"),
    (lambda: cifar_resnet(20, pretrained=False), {"layer1.0.conv2": [1]}, ValueError, "residual add"),
    (lambda: NETS["grouped_consumer"]().model, {"conv": [0, 1]}, ValueError, "equal groups"),
    (lambda: SharedConsumer(), {"conv": [0]}, ValueError, "calls 2 times"),
    (lambda: SharedConsumer(), {"shared": [0]}, ValueError, "called 2 times"),
    (lambda: TiedMLP(), {"l1": [0]}, ValueError, "tied"),
    (lambda: HardCodedView(), {"conv": [0]}, ValueError, "view would not select the same channels.*x.flatten"),
    (lambda: LinearFirst(), {"conv": [0]}, ValueError, "cannot infer an input.*pass example="),
])
def test_refusals(make, removals, error, match):
    model = make()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=match):
        remove_filters(model, removals)
    assert state_equal(model.state_dict(), before)


def test_layer_given_twice_and_bad_example():
    m = NETS["bn_after_act"]().model
    with pytest.raises(ValueError, match="given twice"):
        remove_filters(m, {"conv1": [0], m.conv1: [1]})
    with pytest.raises(TypeError, match="example must be an input tensor"):
        remove_filters(m, {"conv1": [0]}, example=[1, 3, 16, 16])


# ---------------------------------------------------------------------------------------------------
# save / load


def test_save_and_reload_in_a_fresh_process(tmp_path):
    x, _ = cifar10_test(16)
    resnet = remove_filters(cifar_resnet(20), {"layer1.0.conv1": [0, 3, 5], "layer2.1.conv1": range(0, 32, 2),
                                               "layer3.2.conv1": [63]})
    case = NETS["mobilenet_chain_mult2"]()
    xs, _ = make_data(case, 16)
    net = remove_filters(case.model, {"expand": [0, 5, 11], "dw": list(range(1, 24, 4)) + list(range(3, 24, 4))},
                         example=xs[:1])
    extra = {"removed": {"layer1.0.conv1": [0, 3, 5]}, "acc": 0.91, "note": "t", "ok": True, "none": None,
             "tensor": torch.arange(4)}
    save_pruned(resnet, tmp_path / "resnet.pt", extra=extra)
    save_pruned(net, tmp_path / "net.pt")
    torch.save({"x": x, "xs": xs}, tmp_path / "inputs.pt")
    assert sorted(os.listdir(tmp_path)) == ["inputs.pt", "net.pt", "resnet.pt"]     # no temporary files left
    raw = torch.load(tmp_path / "resnet.pt", weights_only=True)
    assert raw["modules"]["layer2.1.conv1"] == {"type": "Conv2d", "in_channels": 32, "out_channels": 16, "groups": 1}

    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {TESTS!r})
        torch.set_num_threads({torch.get_num_threads()})
        from carfast.surgery.pruned_io import load_pruned_model
        from nets import NETS
        d = {str(tmp_path)!r}
        inp = torch.load(d + "/inputs.pt", weights_only=True)
        resnet, extra = load_pruned_model(d + "/resnet.pt")
        net, none = load_pruned_model(d + "/net.pt", model=NETS["mobilenet_chain_mult2"]().model)
        assert none is None
        with torch.no_grad():
            torch.save({{"a": resnet.eval()(inp["x"]), "b": net.eval()(inp["xs"]), "extra": extra}}, d + "/out.pt")
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    with torch.no_grad():
        assert torch.equal(got["a"], resnet(x)) and torch.equal(got["b"], net(xs))
    assert got["extra"].keys() == extra.keys() and torch.equal(got["extra"]["tensor"], extra["tensor"])
    assert {k: v for k, v in got["extra"].items() if k != "tensor"} == {k: v for k, v in extra.items() if k != "tensor"}


def test_load_needs_the_architecture(tmp_path):
    case = NETS["alexnet_head"]()
    x, _ = make_data(case, 8)
    pruned = remove_filters(case.model, {case.layer: [1, 2]}, example=x[:1])
    save_pruned(pruned, tmp_path / "p.pt")
    with pytest.raises(ValueError, match="pass model="):
        load_pruned_model(tmp_path / "p.pt")
    with pytest.raises(ValueError, match="pass model="):
        load_pruned_model(tmp_path / "p.pt", model=NETS["bn_after_act"]().model)
    fresh = NETS["alexnet_head"]().model
    before = copy.deepcopy(fresh.state_dict())
    loaded, extra = load_pruned_model(tmp_path / "p.pt", model=fresh)
    assert extra is None and state_equal(fresh.state_dict(), before)    # model= is copied, not changed
    assert torch.equal(loaded.eval()(x), pruned(x).detach())
    with pytest.raises(TypeError, match="only plain data"):
        save_pruned(pruned, tmp_path / "q.pt", extra={"model": nn.ReLU()})
    torch.save({"w": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a carfast pruned model"):
        load_pruned_model(tmp_path / "other.pt")


def test_arch_record_survives_copy_and_tracing():
    m = cifar_resnet(20, pretrained=False)
    assert copy.deepcopy(m).carfast_arch == {"builder": "cifar_resnet", "kwargs": {"depth": 20},
                                             "input_shape": [3, 32, 32]}
    assert not any("arch" in k for k in m.state_dict())
    gm = fx.symbolic_trace(m)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(gm(x), m(x))


# ---------------------------------------------------------------------------------------------------
# measure


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)               # 8*3*9 + 8 params
        self.bn = nn.BatchNorm2d(8)                             # 16 params (stats are buffers)
        self.dw = nn.Conv2d(8, 16, 3, padding=1, groups=8)      # 16*1*9 + 16
        self.fc = nn.Linear(16, 10)                             # 160 + 10

    def forward(self, x):
        x = self.dw(F.relu(self.bn(self.conv(x))))
        return self.fc(x.mean(dim=(2, 3)))


def test_counts_by_hand_and_latency_restores_flags():
    m = Tiny().train()
    x = torch.randn(2, 3, 5, 6)
    assert count_params(m) == (8 * 27 + 8) + 16 + (16 * 9 + 16) + 170
    assert count_macs(m, x) == 8 * 30 * 27 + 16 * 30 * 9 + 160
    stats = ModelStats.of(m, x, timed=True, repeats=3)
    assert stats.to_dict()["params"] == count_params(m) and stats.latency_s > 0
    assert ModelStats(50, 10).ratio_to(ModelStats(100, 40)) == {"params": 0.5, "macs": 0.25}
    mean = m.bn.running_mean.clone()
    assert latency(m, x, repeats=2, warmup=0) > 0
    assert m.training and m.bn.training and torch.equal(m.bn.running_mean, mean)
    with pytest.raises(ValueError, match="repeats must be an int >= 1"):
        latency(m, x, repeats=0)
