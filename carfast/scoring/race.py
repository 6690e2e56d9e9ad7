"""The raced search: greedy CAR's choice at one step without scoring every candidate on every image.

Exact greedy CAR scores every remaining candidate on all N scoring images, then removes the one with
the smallest key under the selection rule (``selection.py``). Most candidates are clearly worse than the
best after a few hundred images, so the race (``Race``) visits the images in blocks, in an order drawn
at random for the step, and after each block drops the candidates that are confidently worse:

- Each candidate c has a per-image value v_c(i) whose sum over the images is the first element of its
  key: its loss with the candidate removed (rule "loss"), or minus its correctness (rule "accuracy").
  The comparison of c with another candidate l is paired, image by image: d(i) = v_c(i) - v_l(i).
- After n of the N images, c is confidently worse than l when the mean of d over those images exceeds
  ``z * se``, with se = sqrt(s^2 / n * (N - n) / (N - 1)) (s^2 the sample variance of d; the second
  factor the finite-population correction: the images are drawn without replacement from the N, so
  the uncertainty vanishes as n reaches N). c is dropped when ``keep`` candidates that are still in
  the race are each confidently better than it (``keep`` is the step's removals: 1, or ``step``).
- z is the normal quantile of 1 - delta / (keep * (K - 1) * checks) for K candidates and ``checks``
  looks (one after each block but the last): a union bound over every comparison that could drop one
  of the ``keep`` best. So, **under the bound's assumption, the chance that a step drops one of its
  ``keep`` best candidates is at most delta.** The assumption: at each look, the mean of d over the
  images seen is normally distributed around its mean over all N images (the central limit theorem for
  a random sample without replacement). It holds when n is in the hundreds and d is not dominated by
  a few images; an exact (Bernstein-type) bound needs a known range of d, and the loss has none (a
  range-based bound would drop nothing before thousands of images). experiments/RESULTS.md measures
  how often the race's choice differs from the exact search's on real networks.
- The candidates never dropped are evaluated on every image, and the step chooses among them by their
  exact full-data keys, so the chosen removal's scores are exact, and with no drops (``delta=0``) the
  race makes the exact search's choice.
- ``epsilon`` > 0 (in the rule's units per image: nats of mean loss, or a fraction of images) stops
  early once the ``keep`` best so far are confidently within epsilon of every other candidate left
  (their paired mean plus ``z * se`` is at most epsilon); those are then evaluated on the remaining
  images (their recorded scores stay exact) and the rest dropped. This trades exactness for speed.

With several processes (``torch.distributed``) each process splits its own shard of the images into
the same number of blocks; a block is the union of the processes' parts, and the sums the decisions
are made from are all-reduced, so every process drops alike.
"""
from __future__ import annotations

import collections
import math
import statistics
import zlib
from dataclasses import dataclass

import torch

from carfast.distributed import all_reduce_sum
from carfast.scoring.scores import LayerScores

__all__ = ["Race", "RaceOutcome", "SEARCHES", "race", "race_scores", "race_values", "step_plan", "check_search",
           "check_race_rule"]

SEARCHES = ("exact", "race")
_TOL = 1e-9           # per image: paired means closer than this are float noise, never a reason to drop


@dataclass(frozen=True)
class Race:
    """Settings of the raced search (``search=Race(...)`` or ``search="race"`` for these defaults).

    delta: the chance per step, under the bound's assumption (module docstring), of dropping one of the
        step's best candidates; 0 drops none (the exact search, removal for removal).
    epsilon: stop once the best so far are within this of every other candidate, in the rule's units per
        image (nats of mean loss for "loss", a fraction of images for "accuracy"); 0 (default): never.
    block: images per block (per look), over all processes.
    strata: the images are split into this many strata by the current model's loss (``visiting_order``).
    seed: the image order of step t is drawn from (seed, t).
    """
    delta: float = 0.05
    epsilon: float = 0.0
    block: int = 128
    strata: int = 16
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.delta, bool) or not isinstance(self.delta, (int, float)) or not 0 <= self.delta < 1:
            raise ValueError(f"Race: delta must be a probability in [0, 1) (0: drop nothing), got {self.delta!r}")
        if isinstance(self.epsilon, bool) or not isinstance(self.epsilon, (int, float)) or not self.epsilon >= 0:
            raise ValueError(f"Race: epsilon must be a number >= 0 (0: never stop early), got {self.epsilon!r}")
        if isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 2:
            raise ValueError(f"Race: block must be an int >= 2 (images per look), got {self.block!r}")
        if isinstance(self.strata, bool) or not isinstance(self.strata, int) or self.strata < 1:
            raise ValueError(f"Race: strata must be a positive int, got {self.strata!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"Race: seed must be an int, got {type(self.seed).__name__}")

    def settings(self) -> dict:
        return {"delta": self.delta, "epsilon": self.epsilon, "block": self.block, "strata": self.strata,
                "seed": self.seed}


def check_search(search, fn: str):
    """None for the exact search, else the ``Race`` settings; ValueError naming the choices."""
    if search is None or search == "exact":
        return None
    if search == "race":
        return Race()
    if isinstance(search, Race):
        return search
    raise ValueError(f"{fn}: search must be 'exact', 'race' or a carfast.Race(delta=..., epsilon=...), got {search!r}")


def check_race_rule(search, rule: str, fn: str) -> None:
    """ValueError when the raced ``search`` (a ``Race``, not None) is asked to race ``rule``'s key, which is
    not a per-image sum ("lcb")."""
    if search is not None and rule not in ("loss", "accuracy"):
        raise ValueError(f"{fn}: search='race' races per-image sums, and the {rule!r} rule's key is not one; use "
                         "rule='loss' or 'accuracy' with the race, or search='exact'")


@dataclass
class RaceOutcome:
    """What one race did: ``survivors`` (candidate ids evaluated on every image, ascending),
    ``evaluations`` (candidate-image evaluations made, over all processes), ``exhaustive`` (those the exact
    search makes: candidates x images), ``stopped`` (True when epsilon ended it early)."""
    survivors: list
    evaluations: int
    exhaustive: int
    stopped: bool = False


def _z(delta: float, keep: int, candidates: int, checks: int) -> float:
    if delta == 0 or candidates <= keep or checks == 0:
        return math.inf
    return statistics.NormalDist().inv_cdf(1 - delta / (keep * (candidates - 1) * checks))


def visiting_order(base_loss: torch.Tensor, strata: int, generator: torch.Generator
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(order [n] int64, stratum [n] int64) of a process's n images, from the current model's per-image loss.

    The images are split into ``strata`` equal-count strata by that loss (0: the highest), and each
    stratum is shuffled. Stratum h is then visited at a rate proportional to its mean loss (Neyman
    allocation, the loss standing in for the spread of the paired differences, which concentrates on
    the images the model finds hard: on ResNet-20 the tenth of the images with the highest loss carries
    90-97 % of the sum of squared differences): image j of the N_h in stratum h comes at time
    (j + 1) / (N_h * rate_h), the first two of every stratum at once, so every stratum has a variance
    estimate after the first block.
    """
    n = base_loss.numel()
    ranked = base_loss.argsort(descending=True, stable=True)
    stratum = torch.empty(n, dtype=torch.long)
    times = torch.empty(n, dtype=torch.float64)
    for h, members in enumerate(torch.tensor_split(ranked, strata)):
        members = members[torch.randperm(members.numel(), generator=generator)]
        rate = float(base_loss[members].mean()) + 1e-6
        t = torch.arange(1, members.numel() + 1, dtype=torch.float64) / (members.numel() * rate)
        t[:2] = 0
        stratum[members], times[members] = h, t
    order = sorted(range(n), key=lambda i: (float(times[i]), int(stratum[i]), i))
    return torch.tensor(order, dtype=torch.long), stratum


def step_plan(base_loss: torch.Tensor, settings: Race, step_key: str, rank: int = 0, fewest: int | None = None,
              total: int | None = None) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """(order [n], stratum [n], strata, num_blocks): how one process visits its n images in the step named
    ``step_key``, from the current model's per-image loss ``base_loss`` [n]. fewest / total: the images of
    the process holding the fewest / of all processes (default: this one's n), so every process makes the
    same number of strata and blocks. The order is drawn from (``settings.seed``, ``step_key``, ``rank``)."""
    n = base_loss.numel()
    fewest, total = n if fewest is None else fewest, n if total is None else total
    gen = torch.Generator().manual_seed(zlib.crc32(f"{settings.seed}:{step_key}:{rank}".encode()))
    strata = max(1, min(settings.strata, fewest // 2))
    order, stratum = visiting_order(base_loss, strata, gen)
    return order, stratum, strata, max(1, min(math.ceil(total / settings.block), fewest))


def _estimate(S, G, seen, sizes):
    """(mean [A, A], se [A, A]) per image of d = v_a - v_b over all N images, stratified.

    S [H, A] sums, G [H, A, A] products over the images seen of each stratum; seen [H] images seen; sizes
    [H] images per stratum (N = sizes.sum()). A stratum seen whole adds no uncertainty; one with fewer than
    two images seen (and more left) leaves the total unknown: se is infinite."""
    N = float(sizes.sum())
    mean = torch.zeros(S.shape[1], S.shape[1], dtype=torch.float64)
    var = torch.zeros_like(mean)
    for h in range(S.shape[0]):
        n, Nh = float(seen[h]), float(sizes[h])
        if n < 2 and n < Nh:
            return mean, torch.full_like(mean, math.inf)
        m = (S[h][:, None] - S[h][None, :]) / n
        mean += Nh * m
        if n < Nh:
            diag = G[h].diagonal()
            sq = diag[:, None] - 2 * G[h] + diag[None, :]             # sum of d^2
            v = ((sq / n - m ** 2) * n / max(n - 1, 1)).clamp(min=0)
            var += Nh ** 2 * v / n * (Nh - n) / max(Nh - 1, 1)
    return mean / N, var.sqrt() / N


def race(evaluate, num_candidates: int, order: torch.Tensor, stratum: torch.Tensor, sizes: torch.Tensor,
         num_blocks: int, settings: Race, keep: int = 1, reduce=None) -> RaceOutcome:
    """Race ``num_candidates`` candidates (ids 0..K-1) over this process's images, see the module docstring.

    evaluate(ids: list[int], images: [m] int64 ascending) -> [len(ids), m] float64: the per-image values
        (smaller is better) of those candidates on those images of this process.
    order: [n] int64, this process's image positions in the order to visit, split into ``num_blocks``
        blocks (the same number on every process); stratum: [n] int64, each image's stratum; sizes: [H]
        images per stratum over all processes. keep: how many best candidates the step needs (never
        dropped below). reduce(list of tensors) -> their sums over the processes (None: this process alone).
    """
    K, H = num_candidates, int(sizes.numel())
    N = int(sizes.sum())
    alive = list(range(K))
    S = torch.zeros(H, K, dtype=torch.float64)
    G = torch.zeros(H, K, K, dtype=torch.float64)
    seen = torch.zeros(H, dtype=torch.float64)
    z = _z(settings.delta, keep, K, num_blocks - 1)
    evaluations = 0
    blocks = torch.tensor_split(order, num_blocks)
    for b, blk in enumerate(blocks):
        images = blk.sort().values
        vals = evaluate(alive, images)
        hs = stratum[images]
        s = torch.zeros(H, len(alive), dtype=torch.float64)
        g = torch.zeros(H, len(alive), len(alive), dtype=torch.float64)
        m = torch.zeros(H, dtype=torch.float64)
        for h in hs.unique().tolist():
            v = vals[:, hs == h]
            s[h], g[h], m[h] = v.sum(1), v @ v.t(), v.shape[1]
        s, g, m = reduce([s, g, m]) if reduce is not None else (s, g, m)
        idx = torch.tensor(alive)
        S[:, idx] += s
        G[:, idx[:, None], idx[None, :]] += g
        seen += m
        evaluations += len(alive) * int(m.sum())
        if b == num_blocks - 1 or len(alive) <= keep:
            continue
        mean, se = _estimate(S[:, idx], G[:, idx[:, None], idx[None, :]], seen, sizes)
        if settings.epsilon > 0:
            top = sorted(range(len(alive)), key=lambda i: (float(mean[i].sum()), alive[i]))[:keep]
            rest = [i for i in range(len(alive)) if i not in top]
            ucb = (-mean + z * se)[top][:, rest]          # how much worse each chosen may be than each other
            if bool((ucb <= settings.epsilon).all()):     # finish the chosen on the images not seen (exact scores)
                chosen = sorted(alive[i] for i in top)
                evaluate(chosen, torch.cat(blocks[b + 1:]).sort().values)   # non-empty on every process
                return RaceOutcome(chosen, evaluations + len(chosen) * (N - int(seen.sum())), K * N, stopped=True)
        worse = (mean - z * se > _TOL).sum(1)       # survivors each confidently better than this one
        alive = [a for a, w in zip(alive, worse.tolist()) if w < keep]
    return RaceOutcome(sorted(alive), evaluations, K * N)


def race_values(values: torch.Tensor, base_loss: torch.Tensor, settings: Race, step_key: str,
                keep: int = 1) -> RaceOutcome:
    """The race of one process over candidates whose per-image values are already known: ``values`` [K, N]
    (smaller is better; row c: candidate c), the images visited in the order ``step_plan`` draws from the
    current model's per-image loss ``base_loss`` [N] for the step named ``step_key``. It makes the decisions
    ``race_scores`` makes scoring block by block, where those values are the blocks' (for replaying settings
    over recorded values: benchmarks/bench_race_settings.py)."""
    order, stratum, strata, num_blocks = step_plan(base_loss, settings, step_key)
    sizes = torch.bincount(stratum, minlength=strata).double()
    return race(lambda ids, images: values[ids][:, images], values.shape[0], order, stratum, sizes, num_blocks,
                settings, keep)


# ---- the race over scorers (``LayerScorer`` / ``GroupScorer``) ------------------------------------------------
def _values(scores: LayerScores, rule: str) -> torch.Tensor:
    """[F, n] float64 per-image values whose sums are the first element of the rule's key."""
    if rule == "loss":
        return scores.image_loss.double()
    return -scores.image_correct.double()


class _Tally:
    """One scorer's block results, summed into full-data ``LayerScores`` of its candidates that saw every block."""

    def __init__(self):
        self.correct, self.loss = {}, {}      # {filter: [C] int64 / float} summed over the blocks it was scored on
        self.blocks = collections.Counter()    # {filter: blocks it was scored on}
        self.class_totals = self.base_correct = None
        self.base_loss_sum, self.num_images, self.calls = 0.0, 0, 0
        self.pairs, self.seconds, self.last = [0, 0, 0], 0.0, None

    def add(self, part: LayerScores) -> None:
        for i, f in enumerate(part.filters.tolist()):
            self.correct[f] = self.correct.get(f, 0) + part.correct[i]
            self.loss[f] = self.loss.get(f, 0.0) + float(part.loss_sum[i])
            self.blocks[f] += 1
        first = self.class_totals is None
        self.class_totals = part.class_totals.clone() if first else self.class_totals + part.class_totals
        self.base_correct = part.base_correct.clone() if first else self.base_correct + part.base_correct
        self.base_loss_sum += part.base_loss_sum
        self.num_images += part.num_images
        self.calls += 1
        self.pairs = [a + b for a, b in zip(self.pairs, (part.pairs_evaluated, part.pairs_skipped,
                                                          part.pairs_rechecked))]
        self.seconds += part.seconds
        self.last = part

    def result(self, survivors: list[int]) -> LayerScores | None:
        """Full-data ``LayerScores`` of ``survivors`` (each scored on every block this scorer was)."""
        if not survivors:
            return None
        assert all(self.blocks[f] == self.calls for f in survivors), "a survivor missed a block"
        last = self.last
        return LayerScores(last.layer, torch.tensor(survivors, dtype=torch.long), self.num_images, self.class_totals,
                          self.base_correct, torch.stack([self.correct[f] for f in survivors]), self.base_loss_sum,
                          torch.tensor([self.loss[f] for f in survivors], dtype=torch.float64), coupled=last.coupled,
                          method=last.method, backend=last.backend, pairs_evaluated=self.pairs[0],
                          pairs_skipped=self.pairs[1], seconds=self.seconds, precision=last.precision,
                          pairs_rechecked=self.pairs[2], margin_threshold=last.margin_threshold, members=last.members,
                          topk=last.topk, backend_note=last.backend_note)


def race_scores(entries: list, rule: str, settings: Race, process_group, step_key: str, keep: int = 1):
    """Race the candidates of several scorers on the same images (the global schedule races every open
    target's channels at once; the sequential one, one target's).

    entries: [(scorer, [filter indices])]; every scorer holds the same data, with its prefix in memory.
    rule: "loss" or "accuracy". step_key: names the step; with ``settings.seed`` it seeds the image order.
    Returns ([``LayerScores`` of each entry's survivors over all images, or None when none survived],
    ``RaceOutcome``).
    """
    check_race_rule(settings, rule, "race_scores")
    group = process_group if process_group not in (None, False) else None
    rank, world = (0, 1) if group is None else (torch.distributed.get_rank(group),
                                                torch.distributed.get_world_size(group))
    n_local = entries[0][0].num_images
    if any(sc.num_images != n_local for sc, _ in entries):
        raise ValueError("race_scores: the scorers hold different numbers of images; race them on the same data")
    per = torch.zeros(world, dtype=torch.float64)
    per[rank] = n_local
    if group is not None:
        per = all_reduce_sum([per], group, "race_scores")[0]
    order, stratum, strata, num_blocks = step_plan(entries[0][0].image_losses(), settings, step_key, rank,
                                                   int(per.min()), int(per.sum()))
    sizes = torch.bincount(stratum, minlength=strata).double()
    if group is not None:
        sizes = all_reduce_sum([sizes], group, "race_scores")[0]
    ids = [(e, f) for e, (_, filters) in enumerate(entries) for f in filters]
    tallies = [_Tally() for _ in entries]

    def evaluate(alive: list[int], images: torch.Tensor) -> torch.Tensor:
        out = torch.empty(len(alive), images.numel(), dtype=torch.float64)
        for e, (scorer, _) in enumerate(entries):
            rows = [r for r, a in enumerate(alive) if ids[a][0] == e]
            if not rows:
                continue
            part = scorer.score([ids[alive[r]][1] for r in rows], image_loss=rule == "loss", per_image=True,
                                images=images)
            tallies[e].add(part)
            out[rows] = _values(part, rule)
        return out

    reduce = None if group is None else (lambda ts: all_reduce_sum(ts, group, "race_scores"))
    outcome = race(evaluate, len(ids), order, stratum, sizes, num_blocks, settings, keep, reduce)
    survivors = [[ids[a][1] for a in outcome.survivors if ids[a][0] == e] for e in range(len(entries))]
    return [t.result(sv) for t, sv in zip(tallies, survivors)], outcome
