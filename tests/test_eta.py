"""The time-left estimate of greedy pruning (carfast/pruning/eta.py) and the progress lines it feeds."""
import sys

import pytest
import torch
from torch import nn

import carfast
from carfast.pruning.eta import RunClock, candidates_left, suffix_seconds


def _brute_candidates(remaining: int, keep: int, step: int) -> int:
    total = 0
    while remaining > keep:
        total += remaining
        remaining -= min(step, remaining - keep)
    return total


@pytest.mark.parametrize("remaining,keep,step", [(16, 12, 1), (64, 32, 1), (64, 33, 4), (7, 0, 3), (5, 5, 1)])
def test_candidates_left_counts_every_channel_scored(remaining, keep, step):
    assert candidates_left(remaining, keep, step) == _brute_candidates(remaining, keep, step)


def test_suffix_seconds_shrink_along_the_network_and_leave_it_as_it_was():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(5, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(64, 3)).train()
    x = torch.randn(1, 3, 16, 16)
    t = suffix_seconds(net, x, ["0", "2", "8"], batch=8)
    assert t["0"] >= t["2"] >= t["8"] > 0       # each run's time after "0" contains the time after "2"
    assert net.training and all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())
    # scored in closed form, a layer's candidate runs its consumer's share only, not the heavy conv after it
    closed = suffix_seconds(net, x, ["0"], closed_form={"0"}, batch=8)
    assert closed["0"] < t["0"]


def test_clock_predicts_a_run_whose_cost_follows_the_model():
    # two targets, one candidate of "a" costs 3 units of time and one of "b" 1 (weights 30 and 10): after
    # a's first iteration the estimate is exact; before any, there is none
    targets, weights = {"a": (16, 12), "b": (64, 32)}, {"a": 30, "b": 10}
    clock = RunClock(targets, weights, step=1, schedule="sequential", car=True)
    assert clock.left({"a": 16, "b": 64}) is None
    clock.observe("a", 16, 16 * 3.0)
    expected = 3.0 * candidates_left(15, 12, 1) + 1.0 * candidates_left(64, 32, 1)
    assert clock.left({"a": 15, "b": 64}) == pytest.approx(expected)
    # b measured slower than its weight says: its own rate wins for the rest of b
    clock.observe("b", 64, 64 * 2.0)
    assert clock.left({"a": 12, "b": 63}) == pytest.approx(2.0 * candidates_left(63, 32, 1))


def test_clock_of_a_baseline_counts_removals():
    clock = RunClock({"a": (8, 4), "b": (8, 2)}, {"a": 1, "b": 1}, step=1, schedule="sequential", car=False)
    clock.observe("a", 1, 0.5)
    assert clock.left({"a": 7, "b": 8}) == pytest.approx(0.5 * (3 + 6))


def test_global_clock_scores_every_open_target_each_iteration():
    clock = RunClock({"a": (8, 4), "b": (8, 4)}, {"a": 1, "b": 1}, step=2, schedule="global", car=True)
    clock.observe("a", 8, 8.0)
    # 8 removals left in 4 iterations of step 2; each target scored with (8 + 4) / 2 channels on average
    assert clock.left({"a": 8, "b": 8}) == pytest.approx(2 * 4 * 6)


class _Stderr:
    def __init__(self):
        self.text = ""

    def write(self, s):
        self.text += s

    def flush(self):
        pass

    def isatty(self):
        return False


def test_prune_prints_each_line_with_the_time_left_and_the_last_once(monkeypatch):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    data = torch.randn(12, 3, 6, 6), torch.randint(0, 4, (12,))
    err = _Stderr()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr("carfast.progress.LINE_SECONDS", 0.0)
    carfast.prune(net, ["0", "2"], data, keep=6, progress=True)
    lines = err.text.splitlines()
    assert len(lines) == 4 and len(set(lines)) == 4, lines
    assert all("left" in line for line in lines[:-1]) and lines[-1].startswith("carfast: pruning 4/4 channels")
