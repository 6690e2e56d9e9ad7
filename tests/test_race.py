"""The raced search (``search="race"``): the race itself on synthetic per-image values with a known best
candidate, and greedy pruning with it against the exact search (no drops: removal for removal)."""
from __future__ import annotations

import json

import pytest
import torch
from nets import NETS, make_data

import carfast
from carfast.data import cifar10_test
from carfast.models import cifar_resnet
from carfast.scoring.race import Race, _estimate, race, race_scores, race_values, visiting_order


@pytest.fixture(scope="module")
def resnet20():
    return cifar_resnet(20)


def _race_on(values: torch.Tensor, settings: Race, seed: int, keep: int = 1, hardness=None):
    """Race candidates whose per-image values are the rows of ``values`` [K, N]; returns the outcome."""
    K, N = values.shape
    gen = torch.Generator().manual_seed(seed)
    hardness = torch.ones(N, dtype=torch.float64) if hardness is None else hardness
    order, stratum = visiting_order(hardness, settings.strata, gen)
    sizes = torch.bincount(stratum, minlength=int(stratum.max()) + 1).double()
    seen = []

    def evaluate(ids, images):
        seen.append((list(ids), images.clone()))
        return values[ids][:, images]
    blocks = -(-N // settings.block)
    return race(evaluate, K, order, stratum, sizes, blocks, settings, keep), seen


def _synthetic(K: int, N: int, gaps, seed: int) -> torch.Tensor:
    """[K, N] values whose full-data means are exactly 1 + (0, *gaps): candidate 0 is the best by
    construction. Image effects are shared by all candidates (what pairing removes), and the noise is
    larger on the images with larger effects (heavy-ish tails, as losses have)."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(N, generator=g, dtype=torch.float64).exp()
    values = image + torch.randn(K, N, generator=g, dtype=torch.float64) * (0.2 + image)
    means = 1 + torch.tensor([0.0, *gaps], dtype=torch.float64)
    return values - values.mean(1, keepdim=True) + means[:, None]


def test_only_worse_candidates_are_dropped_and_the_best_rarely():
    """Candidate 0 is the full-data best. Over 300 image orders: it is dropped in at most delta of them
    (binomial slack), every drop is of a candidate whose full-data sum is worse, and clearly worse
    candidates are dropped before the end (the race saves work)."""
    K, N, delta, runs = 8, 1200, 0.1, 300
    values = _synthetic(K, N, [0.004, 0.01, 0.05, 0.1, 0.2, 0.4, 0.8], seed=1)
    totals = values.sum(1)
    dropped_best, work = 0, []
    for seed in range(runs):
        out, _ = _race_on(values, Race(delta=delta, block=100, strata=4), seed, hardness=values.std(0))
        dropped_best += 0 not in out.survivors
        assert all(totals[c] >= totals[0] for c in range(K) if c not in out.survivors)
        work.append(out.evaluations / out.exhaustive)
    assert dropped_best <= delta * runs + 3 * (delta * runs) ** 0.5
    assert sorted(work)[runs // 2] < 0.75


def test_equal_candidates_keep_the_full_data_best_at_the_stated_rate():
    """The hard case: every candidate has the same mean, so the full-data best wins by noise alone. The
    race may drop it only as often as delta allows."""
    K, N, delta, runs = 6, 800, 0.2, 300
    misses = 0
    for seed in range(runs):
        g = torch.Generator().manual_seed(10_000 + seed)
        values = torch.randn(K, N, generator=g, dtype=torch.float64)
        best = int(values.sum(1).argmin())
        out, _ = _race_on(values, Race(delta=delta, block=80, strata=2), seed)
        misses += best not in out.survivors
    assert misses <= delta * runs + 3 * (delta * runs) ** 0.5


def test_no_drops_with_delta_zero_and_keep_never_goes_below():
    values = _synthetic(8, 600, [0.5, 1, 1, 2, 2, 3, 3], seed=2)
    out, seen = _race_on(values, Race(delta=0, block=64), 0)
    assert out.survivors == list(range(8)) and out.evaluations == out.exhaustive == 8 * 600
    images = torch.cat([im for _, im in seen]).sort().values
    assert torch.equal(images, torch.arange(600))      # every image once
    out, _ = _race_on(values, Race(delta=0.05, block=64), 0, keep=3)
    assert len(out.survivors) >= 3 and {0, 1} <= set(out.survivors)
    assert out.evaluations < out.exhaustive


def test_epsilon_stops_early_and_finishes_the_chosen():
    values = _synthetic(5, 1000, [0.001, 0.002, 0.003, 0.004], seed=3)
    exact, _ = _race_on(values, Race(delta=0.05, block=100), 0)
    fast, seen = _race_on(values, Race(delta=0.05, epsilon=0.5, block=100), 0)
    assert fast.stopped and len(fast.survivors) == 1 and fast.evaluations < exact.evaluations
    chosen = fast.survivors[0]
    images = torch.cat([im for ids, im in seen if chosen in ids]).sort().values
    assert torch.equal(images, torch.arange(1000))      # the chosen one saw every image


def test_a_stratum_not_yet_seen_twice_leaves_the_total_unknown():
    S = torch.tensor([[1.0, 3.0], [0.0, 0.0]], dtype=torch.float64)
    G = torch.stack([torch.tensor([[1.0, 1.0], [1.0, 5.0]]), torch.zeros(2, 2)]).double()
    for seen in ([2.0, 0.0], [2.0, 1.0]):
        _, se = _estimate(S, G, torch.tensor(seen, dtype=torch.float64), torch.tensor([10.0, 10.0]))
        assert bool(torch.isinf(se).all())
    _, se = _estimate(S, G, torch.tensor([10.0, 1.0], dtype=torch.float64), torch.tensor([10.0, 1.0]))
    assert bool(torch.isfinite(se).all())          # both strata seen whole: no uncertainty left
    assert float(se.max()) == 0


def test_visiting_order_is_a_seeded_permutation_hard_images_first():
    loss = torch.linspace(0, 3, 400, dtype=torch.float64)
    a, sa = visiting_order(loss, 4, torch.Generator().manual_seed(5))
    b, _ = visiting_order(loss, 4, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and torch.equal(a.sort().values, torch.arange(400))
    assert torch.equal(torch.bincount(sa), torch.tensor([100] * 4))
    first = a[:100]
    assert float(loss[first].mean()) > float(loss.mean())       # the high-loss strata come first


@pytest.mark.parametrize("rule", ["loss", "accuracy"])
@pytest.mark.parametrize("layer", ["layer1.0.conv1", "layer3.2.conv1"])      # suffix, closed form
def test_race_without_drops_equals_exact(resnet20, layer, rule):
    x, y = cifar10_test(150)
    keep = resnet20.get_submodule(layer).out_channels - 3
    exact = carfast.prune(resnet20, layer, (x, y), keep=keep, rule=rule, progress=False)
    race_ = carfast.prune(resnet20, layer, (x, y), keep=keep, rule=rule, search=Race(delta=0, block=32),
                          progress=False)
    assert race_.removed == exact.removed
    for a, b in zip(race_.history, exact.history):
        assert a["correct"] == b["correct"] and a["loss"] == pytest.approx(b["loss"], rel=1e-12)
        assert a["evaluations"] == a["exhaustive"] == b["evaluations"] == b["exhaustive"]
    assert race_.settings["search"]["method"] == "race" and "search" not in exact.settings


def test_race_records_exact_scores_and_counts_its_work(resnet20):
    x, y = cifar10_test(400)
    layer = "layer1.0.conv1"
    res = carfast.prune(resnet20, layer, (x, y), keep=13, search="race", progress=False)
    scorer = carfast.LayerScorer(resnet20, layer, (x, y), progress=False)
    for row in res.history:           # each recorded removal scored exactly, on every image
        s = scorer.score([list(scorer.remaining).index(row["filter"]) * 0 + row["filter"]])
        assert row["correct"] == int(s.correct.sum()) and row["loss"] * 400 == pytest.approx(float(s.loss_sum[0]))
        scorer.remove(row["filter"])
    assert all(0 < r["evaluations"] <= r["exhaustive"] for r in res.history)
    assert sum(r["evaluations"] for r in res.history) < sum(r["exhaustive"] for r in res.history)
    assert "evaluations" in str(res.summary())


@pytest.mark.parametrize("layer", ["layer1.0.conv1", "layer3.2.conv1"])      # suffix, closed form
def test_race_replayed_on_whole_data_losses_decides_as_race_scores(resnet20, layer):
    # benchmarks/bench_race_settings.py replays race_values on per-image losses scored once on every image:
    # it must make the decisions race_scores makes block by block.
    x, y = cifar10_test(600)
    scorer = carfast.LayerScorer(resnet20, layer, (x, y), progress=False)
    settings = Race(block=64)
    _, outcome = race_scores([(scorer, scorer.remaining)], "loss", settings, None, "7")
    losses = scorer.score(image_loss=True).image_loss.double()
    replayed = race_values(losses, scorer.image_losses(), settings, "7")
    assert 0 < outcome.evaluations < outcome.exhaustive
    assert (replayed.survivors, replayed.evaluations) == (outcome.survivors, outcome.evaluations)


@pytest.mark.parametrize("name", ["alexnet_head", "untraceable", "mobilenet_chain"])
def test_race_without_drops_on_synthetic_nets(name):
    case = NETS[name]()
    x, y = make_data(case, 96)
    num = carfast.graph.target_num_filters(case.model.get_submodule(case.layer))
    kw = dict(keep=num - min(3, num - 1), progress=False)
    exact = carfast.prune(case.model, case.layer, (x, y), **kw)
    race_ = carfast.prune(case.model, case.layer, (x, y), search=Race(delta=0, block=16), **kw)
    assert race_.removed == exact.removed


def test_race_global_schedule_and_groups(resnet20):
    x, y = cifar10_test(120)
    kw = dict(keep={"layer1.0.conv1": 14, "layer2.0.conv2": 30}, schedule="global", progress=False)
    exact = carfast.prune(resnet20, ["layer1.0.conv1", "layer2.0.conv2"], (x, y), **kw)
    race_ = carfast.prune(resnet20, ["layer1.0.conv1", "layer2.0.conv2"], (x, y), search=Race(delta=0, block=16),
                          **kw)
    assert [(h["layer"], h["filter"]) for h in race_.history] == [(h["layer"], h["filter"]) for h in exact.history]
    raced = carfast.prune(resnet20, ["layer1.0.conv1", "layer2.0.conv2"], (x, y), search=Race(block=16), **kw)
    assert len(raced.history) == len(exact.history)


def test_race_with_bf16_and_the_counting_rule_equals_float32(resnet20):
    x, y = cifar10_test(120)
    kw = dict(keep=13, rule="accuracy", search=Race(delta=0, block=32), progress=False)
    fp32 = carfast.prune(resnet20, "layer1.0.conv1", (x, y), **kw)
    bf16 = carfast.prune(resnet20, "layer1.0.conv1", (x, y), precision="bf16", **kw)
    assert bf16.removed == fp32.removed


def test_race_resumes_bit_for_bit(resnet20, tmp_path):
    x, y = cifar10_test(200)
    ckpt = tmp_path / "race.json"
    search = Race(block=32, seed=3)
    full = carfast.prune(resnet20, "layer1.0.conv1", (x, y), keep=11, search=search, progress=False)
    carfast.prune(resnet20, "layer1.0.conv1", (x, y), keep=13, search=search, checkpoint=ckpt, progress=False)
    assert json.loads(ckpt.read_text())["settings"]["search"]["seed"] == 3
    resumed = carfast.prune(resnet20, "layer1.0.conv1", (x, y), keep=11, search=search, checkpoint=ckpt,
                            progress=False)
    drop = ("seconds",)
    assert [{k: v for k, v in h.items() if k not in drop} for h in resumed.history] == \
        [{k: v for k, v in h.items() if k not in drop} for h in full.history]
    with pytest.raises(ValueError, match="checkpoint"):
        carfast.prune(resnet20, "layer1.0.conv1", (x, y), keep=11, search=Race(block=32, seed=4), checkpoint=ckpt,
                      progress=False)


def test_bad_search_arguments_are_refused(resnet20):
    x, y = cifar10_test(40)
    with pytest.raises(ValueError, match="search must be"):
        carfast.prune(resnet20, "layer1.0.conv1", (x, y), keep=15, search="fast", progress=False)
    with pytest.raises(ValueError, match="lcb"):
        carfast.prune(resnet20, "layer1.0.conv1", (x, y), keep=15, search="race", rule="lcb", progress=False)
    with pytest.raises(ValueError, match="criterion"):
        carfast.prune(resnet20, "layer1.0.conv1", (x, y), keep=15, search="race", criterion="l1", progress=False)
    for bad in (dict(delta=1.5), dict(delta=-0.1), dict(epsilon=-1), dict(block=1), dict(strata=0)):
        with pytest.raises(ValueError, match="Race"):
            Race(**bad)
