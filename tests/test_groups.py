"""Coupling groups: finding them, ``score_group`` against the naive reference, and ``remove_groups``.

The naive reference of a group (``naive.naive_stream_scores``) zeroes channel k of the residual stream
where it is produced (the stem's BatchNorm and every block's output, listed by hand) and reruns the
whole network; carfast's group scoring must give the same top-1 image by image (near ties aside).
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from naive import RESNET20_STREAMS, naive_stream_scores, near_tie
from torch import nn

import carfast
from carfast.graph import find_group
from carfast.models import cifar_resnet
from carfast.surgery import pruned_io

N = 160
STAGES = RESNET20_STREAMS


@functools.lru_cache(maxsize=None)
def resnet20():
    return cifar_resnet(20)


@functools.lru_cache(maxsize=None)
def data(n: int = N):
    return carfast.data.cifar10_test(n)


def assert_matches(res, ref):
    """Per-image top-1 equal to the naive run except at its near ties; counts from those images."""
    assert torch.equal(res.filters, ref.filters)
    diff = res.image_correct != ref.correct
    assert not bool((diff & ~ref.near_ties()).any()), int(diff.sum())
    assert torch.equal(res.base_image_correct, ref.base_correct)
    counts = torch.stack([torch.bincount(ref.labels[res.image_correct[i]], minlength=10)
                          for i in range(len(res.filters))])
    assert torch.equal(res.correct, counts)
    assert torch.allclose(res.loss_sum, ref.loss.sum(1), rtol=1e-5)


@pytest.mark.parametrize("layer", ["conv1", "layer2.1.conv2"])
def test_group_scores_equal_the_naive_stream_zeroing(layer):
    """The ResNet-20 stem group and the stage-2 group, every channel, image by image."""
    model = resnet20()
    x, y = data()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = carfast.score_group(model, layer, (x, y), per_image=True, progress=False)
    ref = naive_stream_scores(model, STAGES[layer], x, y, range(res.filters.numel()))
    assert_matches(res, ref)
    assert res.coupled and res.method == "suffix"
    assert float(res.car.max()) > 0.05          # real groups: some channels matter a lot
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())   # model untouched


def test_any_member_names_the_same_group():
    model = resnet20()
    x, y = data(48)
    a = carfast.score_group(model, "layer2.0.conv2", (x, y), filters=[3, 9, 20], progress=False)
    b = carfast.score_group(model, model.layer2[2].conv2, (x, y), filters=[3, 9, 20], progress=False)
    assert torch.equal(a.correct, b.correct) and a.members == b.members


def test_members_and_the_option_a_convention():
    """One group per stage; the padding shortcut reads stage s (channel i -> i + p) and feeds stage s+1."""
    model = resnet20()
    ex = torch.zeros(1, 3, 32, 32)
    stem = find_group(model, "conv1", ex)
    assert stem.producers == ["conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"]
    roles = {(m.layer, m.role): m for m in stem.members}
    assert ("bn1", "batchnorm") in roles and ("layer2.0.conv1", "input") in roles
    assert roles[("layer2.0.shortcut", "shortcut_in")].channels == [c + 8 for c in range(16)]
    stage2 = find_group(model, "layer2.2.conv2", ex)
    assert stage2.producers == ["layer2.0.conv2", "layer2.1.conv2", "layer2.2.conv2"]
    out = {m.layer: m for m in stage2.members if m.role == "shortcut_out"}["layer2.0.shortcut"]
    assert out.channels == [-1] * 8 + list(range(16)) + [-1] * 8
    stage3 = find_group(model, "layer3.0.conv2", ex)
    assert any(m.layer == "linear" and m.role == "input" for m in stage3.members)
    single = find_group(model, "layer1.0.conv1", ex)
    assert not single.coupled and single.producers == ["layer1.0.conv1"]


def test_uncoupled_layer_scores_equal_score_layer():
    model = resnet20()
    x, y = data(64)
    a = carfast.score_group(model, "layer1.1.conv1", (x, y), progress=False)
    b = carfast.score_layer(model, "layer1.1.conv1", (x, y), progress=False)
    assert not a.coupled
    assert torch.equal(a.correct, b.correct) and torch.allclose(a.loss_sum, b.loss_sum, rtol=1e-5)


def test_group_scorer_remove_matches_the_pruned_network():
    """After ``remove(k)``, scores are those of the network without channel k (physically removed)."""
    model = resnet20()
    x, y = data(64)
    scorer = carfast.GroupScorer(model, "layer3.0.conv2", (x, y), progress=False)
    scorer.remove(5)
    scorer.remove(17)
    got = scorer.score(filters=[0, 40])
    pruned = carfast.remove_groups(model, {"layer3.0.conv2": [5, 17]})
    # in the pruned network channels 0 and 40 of the original are 0 and 38
    ref = carfast.score_group(pruned, "layer3.0.conv2", (x, y), filters=[0, 38], progress=False)
    assert torch.equal(got.base_correct, ref.base_correct)
    assert (got.correct - ref.correct).abs().sum() <= 1      # float rounding of removal vs zeroing
    with pytest.raises(ValueError, match="already removed"):
        scorer.remove(5)


# ---- surgery ----------------------------------------------------------------------------------------

def _zeroed_logits(model, spec, x):
    """Logits with channels zeroed at the outputs of the given modules: spec [(modules, channels)]."""
    mods = dict(model.named_modules())
    handles = []
    for names, ks in spec:
        def hook(_m, _a, out, ks=ks):
            out = out.clone()
            out[:, ks] = 0
            return out
        handles += [mods[n].register_forward_hook(hook) for n in names]
    try:
        with torch.no_grad():
            return model(x)
    finally:
        for h in handles:
            h.remove()


def test_remove_groups_computes_what_the_zeroed_stream_computes(tmp_path):
    model = resnet20()
    x, _ = data(32)
    removals = {"conv1": [2, 5], "layer2.2.conv2": [7, 10, 11, 31], "layer3.1.conv2": list(range(0, 64, 3)),
                "layer1.1.conv1": [0, 4]}
    pruned = carfast.remove_groups(model, removals)
    spec = [(STAGES["conv1"], [2, 5]), (STAGES["layer2.1.conv2"], [7, 10, 11, 31]),
            (STAGES["layer3.2.conv2"], list(range(0, 64, 3))), (["layer1.1.bn1"], [0, 4])]
    with torch.no_grad():
        got = pruned(x)
    assert torch.allclose(got, _zeroed_logits(model, spec, x), atol=1e-4)
    assert pruned.conv1.out_channels == 14 and pruned.layer1[2].conv2.out_channels == 14
    assert pruned.layer2[0].conv1.in_channels == 14 and pruned.linear.in_features == 64 - 22
    assert pruned.layer2[0].shortcut.carfast_channel_map()[:2] == (14, 28)
    assert model.conv1.out_channels == 16                        # the input model is not changed
    path = tmp_path / "pruned.pt"
    pruned_io.save_pruned(pruned, path)
    again, _ = pruned_io.load_pruned_model(path)
    with torch.no_grad():
        assert torch.equal(again(x), got)


def test_remove_groups_refuses_bad_input():
    model = resnet20()
    with pytest.raises(ValueError, match="one coupling group"):
        carfast.remove_groups(model, {"conv1": [1], "layer1.2.conv2": [2]})
    with pytest.raises(ValueError, match="removing all 16"):
        carfast.remove_groups(model, {"conv1": list(range(16))})
    with pytest.raises(ValueError, match="out of range"):
        carfast.remove_groups(model, {"layer2.0.conv2": [32]})
    with pytest.raises(ValueError, match="residual add.*remove_groups"):
        carfast.remove_filters(model, {"conv1": [1]})           # remove_filters still refuses groups


# ---- other graphs ----------------------------------------------------------------------------------

class PadNet(nn.Module):
    """Option-A shortcut written as a function (F.pad), two stages, a residual MLP-style Linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        s = F.relu(self.stem(x))
        s = F.relu(s + self.a(s))
        t = self.bn(self.b(s)) + F.pad(s[:, :, ::2, ::2], (0, 0, 0, 0, 2, 2))
        return self.fc(torch.flatten(F.relu(t), 1))


def _padnet():
    torch.manual_seed(0)
    model = PadNet().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.2, 0.2)
        model.bn.running_var.uniform_(0.5, 1.5)
    x = torch.randn(96, 3, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[::4] = (y[::4] + 1) % 5          # not all correct
    return model, x, y


def test_functional_padding_shortcut_is_scored_exactly_and_cut():
    model, x, y = _padnet()
    res = carfast.score_group(model, "b", (x, y), per_image=True, progress=False)
    shortcut = [m for m in res.members if m["role"] == "shortcut_out"]
    assert shortcut and shortcut[0]["channels"] == [-1, -1, 0, 1, 2, 3, -1, -1]
    fc = [m for m in res.members if m["layer"] == "fc"][0]
    assert fc["role"] == "input" and fc["width"] == 16

    def ref_logits(k):                # the reference: zero channel k of t (the stage-2 stream), rerun
        def fwd(inp):
            s = F.relu(model.stem(inp))
            s = F.relu(s + model.a(s))
            t = model.bn(model.b(s)) + F.pad(s[:, :, ::2, ::2], (0, 0, 0, 0, 2, 2))
            t = t.clone()
            t[:, k] = 0
            return model.fc(torch.flatten(F.relu(t), 1))
        with torch.no_grad():
            return fwd(x)
    for i, k in enumerate(res.filters.tolist()):
        lg = ref_logits(k)
        ok = (lg.argmax(1) == y)
        top2 = lg.topk(2, 1).values
        tie = near_tie(top2[:, 0] - top2[:, 1], lg)
        assert not bool(((ok != res.image_correct[i]) & ~tie).any())
    stem = carfast.score_group(model, "stem", (x, y), progress=False)
    assert stem.coupled and [m["layer"] for m in stem.members if m["role"] == "output"] == ["stem", "a"]
    pruned = carfast.remove_groups(model, {"b": [3, 6]}, example=x[:1])     # the F.pad call becomes a module
    with torch.no_grad():
        assert torch.allclose(pruned(x), ref_logits([3, 6]), atol=1e-5)
    assert pruned.b.out_channels == 6 and pruned.fc.in_features == 6 * 16
    assert pruned.pad_map.carfast_channel_map() == (4, 6, [0, 2, 3], [2, 3, 4])    # stream channel 3 held input 1
    assert model.b.out_channels == 8                                            # the input model is not changed


class UntraceablePadNet(PadNet):
    """PadNet with a data-dependent branch in forward: torch.fx cannot trace it (the recorded pass can)."""

    def forward(self, x):
        if bool(x.abs().sum() >= 0):
            return super().forward(x)
        return super().forward(-x)


def test_functional_padding_in_an_untraceable_model_gets_a_clear_error():
    model, x, y = _padnet()
    untraceable = UntraceablePadNet().eval()
    untraceable.load_state_dict(model.state_dict())
    with pytest.raises(ValueError, match="torch.fx cannot trace the model.*make it a module"):
        carfast.remove_groups(untraceable, {"b": [3]}, example=x[:1])


class LRNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        s = self.a(x) + self.b(x)
        return self.head(F.local_response_norm(s, 2).mean((2, 3)))


def test_unsupported_graph_gets_a_clear_error():
    x, y = torch.randn(4, 3, 8, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"score_group: layer 'a': its channels reach local_response_norm.*"
                                         "mixes neighbouring channels"):
        carfast.score_group(LRNNet().eval(), "a", (x, y), progress=False)


def test_small_memory_budget_and_batches_give_the_same_scores():
    """Chunks of a few images and small pair batches (a tight memory_budget) change nothing."""
    model = resnet20()
    x, y = data(40)
    a = carfast.score_group(model, "layer3.1.conv2", (x, y), filters=[0, 7, 63], progress=False)
    b = carfast.score_group(model, "layer3.1.conv2", [(x[:25], y[:25]), (x[25:], y[25:])], filters=[0, 7, 63],
                            memory_budget=1 << 20, batch_size=5, progress=False)
    scorer = carfast.GroupScorer(model, "layer3.1.conv2", (x, y), memory_budget=1 << 20, progress=False)
    assert scorer.chunk_images < 40 and scorer.pair_batch < 128
    assert torch.equal(a.correct, b.correct) and torch.allclose(a.loss_sum, b.loss_sum, rtol=1e-5)


def test_bf16_group_scores_equal_float32():
    """precision="bf16" with the float32 re-run of near ties gives float32's counts; plain float32 without the
    optimised suffix (fold_bn=False) too."""
    model = resnet20()
    x, y = data(64)
    exact = carfast.score_group(model, "layer2.1.conv2", (x, y), per_image=True, progress=False,
                                options=carfast.ScoreOptions(fold_bn=False, channels_last=False))
    fast = carfast.score_group(model, "layer2.1.conv2", (x, y), per_image=True, progress=False)
    low = carfast.score_group(model, "layer2.1.conv2", (x, y), per_image=True, precision="bf16", progress=False)
    assert torch.equal(fast.image_correct, exact.image_correct)
    assert torch.equal(low.image_correct, exact.image_correct) and torch.equal(low.correct, exact.correct)
    assert low.precision == "bf16" and low.pairs_rechecked > 0 and low.margin_threshold > 0
    assert torch.allclose(low.loss_sum, exact.loss_sum, rtol=2e-2)


@pytest.mark.parametrize("kw, match", [(dict(memory_budget=-1), "memory_budget must be a positive"),
                                       (dict(batch_size=0), "batch_size must be a positive int"),
                                       (dict(precision="int8"), "precision 'int8' unknown"),
                                       (dict(filters=[16]), "filter 16 is out of range")])
def test_score_group_bad_arguments(kw, match):
    x, y = data(4)
    with pytest.raises(ValueError, match=match):
        carfast.score_group(resnet20(), "conv1", (x, y), progress=False, **kw)


def test_remove_groups_of_an_uncoupled_layer_equals_remove_filters():
    """A layer whose channels enter no add (here through a depthwise conv, which the group walk does not
    follow) is cut as remove_filters cuts it."""
    import nets
    case = nets.NETS["mobilenet_chain"]()
    x, _ = nets.make_data(case, 8)
    a = carfast.remove_groups(case.model, {case.layer: [0, 2]}, example=x[:1])
    b = carfast.remove_filters(case.model, {case.layer: [0, 2]}, example=x[:1])
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
