"""The greedy loop of ``carfast.prune``, for layers and coupling groups alike.

- ``schedule="sequential"`` (the paper's): the targets one after another. One scorer per target
  (``LayerScorer`` of the layer or its ``Group``) keeps the prefix cached and is updated in place after
  each removal (docs/design.md 3.7), so each iteration only evaluates the remaining channels' removals.
  When a target is done it is physically pruned (``remove_filters``) and the next
  is scored on the smaller model.
- ``schedule="global"``: each iteration scores every open target on the current (physically pruned)
  model and removes the best channels across all of them.

The choice is the channel with the smallest key under CAR's selection rule (``selection.rule_keys``; by
default the removal that leaves the smallest loss, then the most images correct; the paper's: the most
images correct, then the smallest loss), then (global) the earlier listed target, then the lowest
original index; with a baseline criterion the lowest importance, then target, then index. A criterion
whose scores belong to the filters (``fixed_order``: the random baseline) is drawn once per target on
the input model, so its removals follow one permutation. A target with an accuracy budget
(``max_accuracy_drop``) stops before the removal that would take accuracy below the input model's
minus its budget; the others go on, and ``stops`` says where and why each one stopped.
"""
from __future__ import annotations

import collections
import time
from dataclasses import dataclass

import torch

from carfast.criteria import draws_fixed_order
from carfast.distributed import all_reduce_sum
from carfast.progress import Progress
from carfast.pruning.checkpoint import write_checkpoint
from carfast.pruning.eta import RunClock
from carfast.pruning.evaluate import Evaluation, evaluate
from carfast.scoring import LayerScorer
from carfast.scoring.race import race_scores
from carfast.scoring.selection import score_by_rule, settled_keys
from carfast.surgery import remove_filters

__all__ = ["Candidate", "GreedyRun"]

_FN = "prune"


@dataclass
class Candidate:
    """A channel that may be removed next: its order key, target, original index, and the accuracy of the
    model without it where the scoring already says (CAR), else None."""
    key: tuple
    layer: str
    index: int
    evaluation: Evaluation | None = None


def _evaluation(scores, i: int) -> Evaluation:
    return Evaluation(int(scores.correct[i].sum()), float(scores.loss_sum[i]), scores.num_images)


class GreedyRun:
    """The state of one pruning run: the current model, each target's original channel indices, the history."""

    def __init__(self, config, model, data, base: Evaluation, replay, settings, progress, prebuilt, weights: dict):
        self.config, self.model, self.data, self.base = config, model, data, base
        self.input_model = model           # the cuts make smaller copies; this one stays as it came
        self.fixed: dict = {}              # {target: [units] importance by original index} (fixed_order criteria)
        self.targets = {t.name: t for t in config.targets}
        self.orig = {t.name: list(range(t.units)) for t in config.targets}
        self.threshold = {t.name: None if t.max_drop is None else base.accuracy - t.max_drop for t in config.targets}
        self.replay = collections.deque(replay)
        self.settings = settings
        self.left = {t.name: t.units for t in config.targets}     # {target: channels left to consider}
        self.clock = RunClock({t.name: (t.units, t.keep) for t in config.targets}, weights, config.step,
                              config.schedule, car=config.criterion is None)
        self.bar = Progress(progress, sum(t.units - t.keep for t in config.targets), "pruning", unit="channels",
                            estimate=lambda: self.clock.left(self.left))
        self.history: list[dict] = []
        self.stops: dict = {}              # {target: why and where it stopped before reaching keep}
        self.iteration = -1
        self.first_scores = {}             # {target: LayerScores of its first scoring} (CAR): the class-wise view
        self.prebuilt = prebuilt           # {target: scorer} on the input model, valid until the first cut
        self._t = time.perf_counter()      # when the last removal was recorded (its time is since then)
        self.work = [0, 0]                 # candidate-image evaluations since then: made, and the exact search's

    # -- bookkeeping ---------------------------------------------------------------------------------------
    def record(self, layer: str, index: int, ev: Evaluation, remaining: int, planned: int) -> None:
        """Append a history row for a removal just made (``planned``: removals chosen in this iteration)."""
        now = time.perf_counter()
        self.history.append({"step": len(self.history), "iteration": self.iteration, "planned": planned,
                             "layer": layer, "filter": int(index), "correct": ev.correct, "accuracy": ev.accuracy,
                             "loss": ev.loss, "remaining": remaining, "seconds": now - self._t})
        if self.config.criterion is None:   # CAR's work: candidate-image evaluations, and the exact search's
            self.history[-1]["evaluations"], self.history[-1]["exhaustive"] = self.work
            self.work = [0, 0]
        if self.config.criterion is not None:      # a baseline's work is its removals (CAR's: observed in scoring)
            self.clock.observe(layer, 1, now - self._t)
        self._t = now
        self.left[layer] = remaining
        self.bar.update(1)
        if self.config.checkpoint is not None:
            write_checkpoint(self.config.checkpoint, self.settings, self.history)

    def next_replayed(self, layer: str | None = None):
        """The next recorded removal (a history row) when resuming, else None. A recorded removal from
        another target than this run prunes now ends the replay (a run continued to a smaller keep)."""
        if not self.replay:
            return None
        if layer is not None and self.replay[0]["layer"] != layer:
            self.replay.clear()
            return None
        row = self.replay.popleft()
        self.history.append(row)
        self.left[row["layer"]] = row["remaining"]
        self.bar.update(1)
        self.iteration = row["iteration"]
        self._t = time.perf_counter()
        return row

    def stop(self, layer: str, ev: Evaluation, remaining: int) -> None:
        """Stop pruning ``layer`` at ``remaining`` channels: its next removal would cross its accuracy budget."""
        self.stops[layer] = {"reason": "max_accuracy_drop", "remaining": remaining,
                             "accuracy_after_next": ev.accuracy, "threshold": self.threshold[layer],
                             "iteration": self.iteration}
        self.left[layer] = self.targets[layer].keep                # no more work for it

    def crosses(self, layer: str, ev: Evaluation) -> bool:
        t = self.threshold[layer]
        return t is not None and ev.accuracy < t

    def cut(self, removals: dict) -> None:
        """Physically remove {target: [current indices]} from the current model."""
        removals = {n: ks for n, ks in removals.items() if ks}
        if not removals:
            return
        self.model = remove_filters(self.model, {self.targets[n].spec: ks for n, ks in removals.items()},
                                    example=self.config.example)
        self.prebuilt = {}
        for n, ks in removals.items():
            gone = set(ks)
            self.orig[n] = [o for i, o in enumerate(self.orig[n]) if i not in gone]

    def scorer(self, name: str):
        """A scorer of target ``name`` on the current model."""
        s = self.prebuilt.pop(name, None)
        if s is None:
            s = LayerScorer(self.model, self.targets[name].spec, self.data, progress=False, **self.config.score_options)
        if s.num_filters != len(self.orig[name]):
            raise ValueError(f"{_FN}: removing channels of other targets also changed {name!r} ({s.num_filters} "
                             f"{self.targets[name].unit_word} where {len(self.orig[name])} remain; it lies on their "
                             "channels' way, e.g. a depthwise conv): prune it on its own")
        return s

    def car_scores(self, name: str, scorer, picks: int = 1):
        """Score every remaining channel of target ``name``'s ``scorer`` (the exact search), or race them
        (``search``: only the ``picks`` best need to survive); returns (LayerScores of the channels scored
        on every image, [removal key per channel])."""
        if self.config.search is not None:
            return self.raced({name: scorer}, picks)[name]
        t0 = time.perf_counter()
        out = score_by_rule(scorer, self.config.rule, self.config.score_options["process_group"],
                            exact_first=self.config.step)
        self.clock.observe(name, len(scorer.remaining), time.perf_counter() - t0)
        self.count_work(len(scorer.remaining) * self.base.num_images)
        return out

    def raced(self, scorers: dict, picks: int) -> dict:
        """Race the remaining channels of {target: scorer} on the same images (``scoring.race``); returns
        {target: (LayerScores of its survivors, [their keys])} for the targets with survivors."""
        t0 = time.perf_counter()
        entries = [(sc, sc.remaining) for sc in scorers.values()]
        results, outcome = race_scores(entries, self.config.rule, self.config.search,
                                       self.config.score_options["process_group"], str(self.iteration), picks)
        seconds = time.perf_counter() - t0
        total = sum(len(sc.remaining) for sc in scorers.values())
        out = {}
        for (name, sc), s in zip(scorers.items(), results):
            self.clock.observe(name, len(sc.remaining), seconds * len(sc.remaining) / total)
            if s is not None:
                out[name] = (s, settled_keys(sc, s, self.config.rule, exact_first=self.config.step))
        self.count_work(outcome.evaluations, outcome.exhaustive)
        return out

    def count_work(self, evaluations: int, exhaustive: int | None = None) -> None:
        """Candidate-image evaluations made (and those the exact search makes) towards the next removal."""
        self.work[0] += evaluations
        self.work[1] += evaluations if exhaustive is None else exhaustive

    # -- sequential ----------------------------------------------------------------------------------------
    def sequential(self) -> None:
        for name in self.config.names:
            scorer = self.scorer(name)
            start = list(self.orig[name])           # scorer index -> original index
            keep = self.targets[name].keep
            while len(scorer.remaining) > keep and name not in self.stops:
                row = self.next_replayed(name)
                if row is not None:
                    scorer.remove(start.index(row["filter"]))
                    continue
                self.iteration += 1
                ranked, known = self.rank_in_layer(scorer, name, start)
                picks = ranked[:min(self.config.step, len(scorer.remaining) - keep)]
                for j in picks:
                    s = known.pop(j, None)                          # the first pick's score is known
                    if s is None:
                        s = scorer.score([j])
                        self.count_work(s.num_images)
                    known.clear()
                    ev = _evaluation(s, s.filters.tolist().index(j))
                    if self.crosses(name, ev):
                        self.stop(name, ev, len(scorer.remaining))
                        break
                    scorer.remove(j)
                    self.record(name, start[j], ev, len(scorer.remaining), len(picks))
            self.cut({name: list(scorer.removed)})

    def rank_in_layer(self, scorer, name: str, start: list):
        """Remaining scorer indices, best to remove first; and {index: LayerScores} already known."""
        if self.config.criterion is None:
            if not scorer.removed and not scorer.cached:
                scorer.prepare()    # the prefix pass, once per target: not part of the per-candidate cost
            picks = min(self.config.step, len(scorer.remaining) - self.targets[name].keep)
            s, keys = self.car_scores(name, scorer, picks)
            self.first_scores.setdefault(name, s)
            filters = s.filters.tolist()
            order = [filters[i] for i in sorted(range(len(filters)), key=lambda i: (keys[i], filters[i]))]
            return order, {order[0]: s}
        rem = scorer.remaining
        if draws_fixed_order(self.config.criterion):
            imp = self.fixed_importance(name)[[start[j] for j in rem]]
        else:
            now = self.model
            if scorer.removed:     # the criterion sees the model as it is now
                now = remove_filters(self.model, {self.targets[name].spec: list(scorer.removed)},
                                     example=self.config.example)
            imp = self.importance_of(name, now, len(rem))
        return sorted(rem, key=lambda j: (float(imp[rem.index(j)]), start[j])), {}

    def fixed_importance(self, name: str) -> torch.Tensor:
        """[units] importance of target ``name``'s channels by original index, drawn once on the input model."""
        if name not in self.fixed:
            self.fixed[name] = self.importance_of(name, self.input_model, self.targets[name].units)
        return self.fixed[name]

    def importance_of(self, name: str, model, expected: int) -> torch.Tensor:
        crit, pg = self.config.criterion, self.config.score_options["process_group"]
        imp = torch.as_tensor(crit(model, name, self.data), dtype=torch.float64).flatten().cpu()
        if pg is not False and pg is not None:
            imp = all_reduce_sum([imp], pg, _FN)[0] / torch.distributed.get_world_size(pg)
        if imp.numel() != expected or not bool(torch.isfinite(imp).all()):
            raise ValueError(f"{_FN}: criterion {self.config.criterion_name!r} returned {imp.numel()} scores for "
                             f"{name!r}, which has {expected} {self.targets[name].unit_word} (or some were not "
                             f"finite); it must return one finite score per {self.targets[name].unit_word[:-1]}")
        return imp

    # -- global --------------------------------------------------------------------------------------------
    def candidates(self, open_targets: list[str], picks: int) -> list[Candidate]:
        out = []
        if self.config.criterion is None and self.config.search is not None:
            scored = self.raced({n: self.scorer(n) for n in open_targets}, picks)
        for pos, n in enumerate(open_targets):
            if self.config.criterion is None:
                if self.config.search is None:
                    s, keys = self.car_scores(n, self.scorer(n))
                elif n in scored:
                    s, keys = scored[n]
                else:
                    continue
                if len(self.orig[n]) == self.targets[n].units:      # intact: indices are the original ones
                    self.first_scores.setdefault(n, s)
                for i, k in enumerate(s.filters.tolist()):
                    out.append(Candidate((*keys[i], pos, self.orig[n][k]), n, self.orig[n][k], _evaluation(s, i)))
            else:
                imp = self.fixed_importance(n)[self.orig[n]] if draws_fixed_order(self.config.criterion) \
                    else self.importance_of(n, self.model, len(self.orig[n]))
                out += [Candidate((float(v), pos, self.orig[n][i]), n, self.orig[n][i]) for i, v in enumerate(imp)]
        return sorted(out, key=lambda c: c.key)

    def global_(self) -> None:
        while True:
            open_targets = [n for n in self.config.names if len(self.orig[n]) > self.targets[n].keep
                            and n not in self.stops]
            if not open_targets:
                return
            row = self.next_replayed()
            if row is not None:
                self.cut({row["layer"]: [self.orig[row["layer"]].index(row["filter"])]})
                continue
            self.iteration += 1
            budget = {n: len(self.orig[n]) - self.targets[n].keep for n in open_targets}
            picks = []
            for c in self.candidates(open_targets, min(self.config.step, sum(budget.values()))):
                if len(picks) < self.config.step and budget[c.layer] > 0:
                    picks.append(c)
                    budget[c.layer] -= 1
            for i, c in enumerate(picks):
                if c.layer in self.stops:
                    continue
                one = {self.targets[c.layer].spec: [self.orig[c.layer].index(c.index)]}
                tentative = remove_filters(self.model, one, example=self.config.example)
                ev = c.evaluation if i == 0 and c.evaluation is not None else \
                    evaluate(tentative, self.data, process_group=self.config.score_options["process_group"],
                             topk=self.config.score_options.get("topk", 1))
                if i > 0 and self.config.criterion is None:
                    self.count_work(ev.num_images)
                if self.crosses(c.layer, ev):
                    self.stop(c.layer, ev, len(self.orig[c.layer]))
                    continue
                self.model, self.prebuilt = tentative, {}
                self.orig[c.layer].remove(c.index)
                self.record(c.layer, c.index, ev, len(self.orig[c.layer]), len(picks))
