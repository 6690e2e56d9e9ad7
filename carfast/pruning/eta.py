"""How long a greedy pruning run has left, from the measured cost of its work.

Greedy CAR's cost is not spread evenly over the removals: every iteration scores all the channels a
target has left (fewer each time), and one candidate of an early layer runs most of the network while
one of the last layer runs a conv or two. So the time left is counted in *work*:
candidate evaluations (channels scored), each weighted by what one candidate runs, timed once on a
batch before the run: the consumer's share for one channel and the network after it (the scorer caches
the rest; elementwise work on large early feature maps costs more than its multiply-accumulates say).
The seconds per unit of work are measured as the run goes: per target once it has been scored, else
the mean over the targets scored so far. A baseline criterion makes one evaluation per removal (plus
the criterion itself, a forward or two of the whole network), so its work is its removals, all of one
weight.

Iterations left with ``r`` channels, ``keep`` to keep and a greedy step ``s``: ``r, r - s, ...`` while
above ``keep``. Sequential schedule: a target's candidates are their sum. Global schedule: every
iteration scores every open target; assuming the removals spread over the targets in proportion to
what each has left to remove, target t is scored in all ``I`` iterations left with on average
``(r_t + keep_t) / 2`` channels.
"""
from __future__ import annotations

import math
import statistics
import time

import torch
from torch import nn

from carfast.batching import eval_mode

__all__ = ["RunClock", "suffix_seconds", "candidates_left"]


def _now(x: torch.Tensor) -> float:
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
    return time.perf_counter()


def _calls(model: nn.Module, x: torch.Tensor) -> tuple[list, float]:
    """One forward of ``x``: [(module name, in channels, start, end)] of every Conv / Linear call in order,
    and the time the forward ended."""
    names = {m: n for n, m in model.named_modules()}
    calls, starts = [], []

    def pre(_m, _args):
        starts.append(_now(x))

    def post(m, _args, _out):            # (returns None: the output stays as it is)
        width = m.in_channels if isinstance(m, nn.modules.conv._ConvNd) else m.in_features
        calls.append((names[m], width, starts.pop(), _now(x)))

    mods = [m for m in model.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    handles = [m.register_forward_pre_hook(pre) for m in mods] + [m.register_forward_hook(post) for m in mods]
    try:
        model(x)
        end = _now(x)
    finally:
        for h in handles:
            h.remove()
    return sorted(calls, key=lambda c: c[2]), end


def suffix_seconds(model: nn.Module, example: torch.Tensor, names, *, closed_form=(), batch: int = 64,
                   repeats: int = 3) -> dict[str, float]:
    """{name: median seconds of what one candidate of layer ``name`` runs}, timed on forwards of ``batch``
    copies of ``example[:1]``: the layer that reads it next (its consumer) for one input channel, i.e.
    its time / its input channels, and everything after the consumer (the consumer's other channels are
    cached by the scorer). A layer scored in ``closed_form`` (its consumer feeds the logits through
    per-channel ops, evaluated in one fused pass): the consumer's share alone. A layer read by nothing
    later: the time after it. Up to a common factor, which the run measures. The model runs
    ``repeats + 1`` times in eval mode without gradients; its flags are restored."""
    x = example[:1].expand(batch, *example.shape[1:]).contiguous()
    runs = []
    with eval_mode(model), torch.no_grad():
        model(x)                                          # warm-up
        for _ in range(repeats):
            calls, end = _calls(model, x)
            run = {}
            for n in names:
                mine = next((c for c in calls if c[0] == n), None)
                if mine is None:
                    run[n] = 0.0
                    continue
                nxt = next((c for c in calls if c[2] >= mine[3]), None)
                after = 0.0 if n in closed_form else end - nxt[3] if nxt is not None else end - mine[3]
                run[n] = after + ((nxt[3] - nxt[2]) / nxt[1] if nxt is not None else 0.0)
            runs.append(run)
    return {n: max(statistics.median(r[n] for r in runs), 1e-9) for n in names}


def candidates_left(remaining: int, keep: int, step: int) -> int:
    """Channels scored by the iterations left of one target: ``remaining + (remaining - step) + ...``
    while above ``keep``."""
    iterations = max(0, math.ceil((remaining - keep) / step))
    return iterations * remaining - step * iterations * (iterations - 1) // 2


class RunClock:
    """Seconds left of a greedy run (``left``), from work measured by ``observe``.

    ``targets``: {name: (channels, keep)}; ``weights``: {name: cost of one unit of its work} (suffix
    seconds for CAR, 1 for a baseline criterion); ``car``: whether every iteration scores all channels.
    """

    def __init__(self, targets: dict, weights: dict, step: int, schedule: str, car: bool):
        self.targets, self.weights, self.step, self.schedule, self.car = targets, weights, step, schedule, car
        self.seconds = dict.fromkeys(targets, 0.0)     # measured seconds of each target's work
        self.work = dict.fromkeys(targets, 0.0)        # and the weighted work they bought

    def observe(self, name: str, units: int, seconds: float) -> None:
        """``units`` of target ``name``'s work (channels scored, or one removal) took ``seconds``."""
        self.seconds[name] += seconds
        self.work[name] += units * self.weights[name]

    def _units_left(self, remaining: dict) -> dict:
        """{target: units of work left} given {target: channels remaining}."""
        if not self.car:
            return {n: max(0, r - self.targets[n][1]) for n, r in remaining.items()}
        if self.schedule == "sequential":
            return {n: candidates_left(r, self.targets[n][1], self.step) for n, r in remaining.items()}
        to_remove = sum(max(0, r - self.targets[n][1]) for n, r in remaining.items())
        iterations = math.ceil(to_remove / self.step)
        return {n: iterations * (r + self.targets[n][1]) / 2 if r > self.targets[n][1] else 0
                for n, r in remaining.items()}

    def left(self, remaining: dict) -> float | None:
        """Seconds left given {target: channels remaining}; None before any work was measured."""
        measured = sum(self.work.values())
        if measured <= 0:
            return None
        mean_rate = sum(self.seconds.values()) / measured
        total = 0.0
        for n, units in self._units_left(remaining).items():
            rate = self.seconds[n] / self.work[n] if self.work[n] > 0 else mean_rate
            total += units * self.weights[n] * rate
        return total
