"""The random baseline is a uniform random choice: greedy pruning with ``criterion="random"`` removes along
one seeded permutation of each layer's filters (drawn once on the input model), not the same position of
a fresh draw on every smaller layer (which removed runs of neighbouring filters)."""
import functools

import pytest
import torch
from nets import randomize
from torch import nn

import carfast
from carfast.criteria import draws_fixed_order, random_scores


def _net(width: int = 16, seed: int = 0) -> nn.Sequential:
    """conv "0" (width filters) -> ReLU -> conv "2" (width filters) -> ReLU -> pool -> Linear "6"."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 4))
    return randomize(net, seed).eval()


def _data(n: int = 8):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 6, 6, generator=g), torch.randint(0, 4, (n,), generator=g)


def _removed(net, layers, keep, seed: int, **kw) -> dict:
    crit = functools.partial(random_scores, seed=seed)
    return carfast.prune(net, layers, _data(), keep=keep, criterion=crit, progress=False, **kw).removed


def _adjacent(order: list[int]) -> int:
    """How many consecutive removals are neighbouring filters (|i - j| == 1)."""
    return sum(abs(a - b) == 1 for a, b in zip(order, order[1:]))


def test_removals_follow_one_permutation_drawn_on_the_input_model():
    net = _net()
    for seed in (0, 5):
        draw = random_scores(net, "0", seed=seed)
        removed = _removed(net, ["0"], 4, seed)["0"]
        assert removed == torch.argsort(draw, stable=True)[:12].tolist()


def test_layers_get_independent_draws():
    net = _net()
    assert not torch.equal(torch.argsort(random_scores(net, "0")), torch.argsort(random_scores(net, "2")))


def test_first_removal_is_uniform_over_filters_across_seeds():
    width, seeds = 8, 160
    net = _net(width)
    counts = torch.zeros(width)
    for seed in range(seeds):
        counts[_removed(net, ["0"], width - 1, seed)["0"][0]] += 1
    expected = seeds / width
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 24.32, f"first removals {counts.tolist()} are not uniform (chi-square {chi2:.1f}, 7 dof, p < 0.001)"


@pytest.mark.parametrize("schedule", ["sequential", "global"])
def test_neighbouring_removals_occur_no_more_than_chance(schedule):
    # a uniform permutation of n filters has each consecutive pair neighbours with probability 2 / n: removing
    # m of n gives (m - 1) * 2 / n such pairs on average (about 1.9 here); the old loop gave runs of them
    width, m = 32, 31
    seeds = 12 if schedule == "sequential" else 5      # global re-evaluates each removal: slower
    net = _net(width)
    counts = [_adjacent(_removed(net, ["0"], width - m, seed, schedule=schedule)["0"]) for seed in range(seeds)]
    expected = (m - 1) * 2 / width
    assert sum(counts) / seeds < 2 * expected, f"neighbouring removals per run {counts}, chance {expected:.2f}"


def test_global_schedule_removes_in_the_order_of_the_draws_across_layers():
    net = _net()
    removed = _removed(net, ["0", "2"], 10, 3, schedule="global")
    for layer in ("0", "2"):
        assert removed[layer] == torch.argsort(random_scores(net, layer, seed=3), stable=True)[:6].tolist()


def test_fixed_order_is_seen_through_partials_and_only_where_declared():
    assert draws_fixed_order(random_scores) and draws_fixed_order(functools.partial(random_scores, seed=2))
    assert not draws_fixed_order(carfast.criteria.l1_norm)
    assert not draws_fixed_order(lambda model, layer, data: random_scores(model, layer))
