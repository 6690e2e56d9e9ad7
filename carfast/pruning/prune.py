"""Greedy CAR pruning (Abbasi-Asl and Yu): score, remove the filter that costs least, re-score, repeat.

``prune`` runs the same loop for CAR and for the baseline criteria of ``criteria.py``:

- ``schedule="sequential"`` (the paper's): the layers one after another. One ``LayerScorer`` per layer
  keeps the prefix cached and is updated in place after each removal (``LayerScorer.remove``,
  docs/design.md 3.7), so each iteration only evaluates the remaining filters' ablations. When a layer is
  done it is physically pruned (``surgery.remove_filters``) and the next layer is scored on the smaller
  model.
- ``schedule="global"``: each iteration scores every listed layer on the current (physically pruned)
  model and removes the best filters across all of them. The scorers are rebuilt every iteration
  (a removal in one layer changes every other layer's prefix or suffix).

The choice at each iteration is the filter whose removal keeps the most images correct, then the
smallest loss, then (global) the earlier listed layer, then the lowest original index; with a baseline
criterion it is the lowest importance, then layer, then index. ``tests/naive.py`` holds the naive greedy
loop (one full network run per candidate) that this must equal.

``checkpoint=path`` writes the settings and history as JSON after every removal (atomically); a run
started again with the same arguments replays the recorded removals and goes on, to the same result.
"""
from __future__ import annotations

import collections.abc
import copy
import hashlib
import json
import os
import time

import torch
from torch import nn

from carfast.atomic import write_json_atomic
from carfast.batching import Progress, as_batches, check_batch, model_device
from carfast.distributed import UNSET, all_reduce_sum, process_group_argument, resolve_group
from carfast.errors import resolve_layer
from carfast.graph.split import target_num_filters
from carfast.pruning.criteria import get_criterion
from carfast.pruning.evaluate import evaluate
from carfast.pruning.result import PruneResult
from carfast.scoring.scorer import LayerScorer
from carfast.surgery.measure import ModelStats
from carfast.surgery.remove import remove_filters

__all__ = ["prune"]

_FN = "prune"
_SCORE_KEYS = ("device", "batch_size", "memory_budget", "backend", "precision", "options", "process_group", "group")
_CHECKPOINT_FORMAT = "carfast-prune-checkpoint/1"


# ---- argument checks ---------------------------------------------------------------------------------
def _layer_names(model: nn.Module, layers) -> list[str]:
    if isinstance(layers, (str, nn.Module)):
        layers = [layers]
    if not isinstance(layers, collections.abc.Iterable):
        raise TypeError(f"{_FN}: layers must be a layer name, a module, or a list of them, got {type(layers).__name__}")
    names = [resolve_layer(model, layer, _FN)[0] for layer in layers]
    if not names:
        raise ValueError(f"{_FN}: layers is empty; name at least one layer to prune")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{_FN}: layers lists {dup} more than once; list each layer once")
    return names


def _keep_one(value, num: int, layer: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{_FN}: keep for {layer!r} must be an int (filters) or a float fraction in (0, 1], "
                        f"got {value!r}")
    if isinstance(value, float):
        if not 0.0 < value <= 1.0:
            raise ValueError(f"{_FN}: keep={value} for {layer!r} is not a fraction in (0, 1]; pass an int to "
                             "keep that many filters")
        return max(1, round(value * num))
    if not 1 <= value <= num:
        raise ValueError(f"{_FN}: keep={value} for {layer!r} is impossible: the layer has {num} filters; keep "
                         f"between 1 and {num}")
    return value


def _keep_counts(keep, names: list[str], nums: dict) -> dict:
    if isinstance(keep, dict):
        keyed = {}
        for k, v in keep.items():
            keyed[k if isinstance(k, str) else next((n for n in names if n == k), k)] = v
        missing = [n for n in names if n not in keyed]
        extra = [k for k in keyed if k not in names]
        if missing or extra:
            raise ValueError(f"{_FN}: keep must give a count for exactly the listed layers; missing {missing}, "
                             f"not listed {extra}")
        return {n: _keep_one(keyed[n], nums[n], n) for n in names}
    return {n: _keep_one(keep, nums[n], n) for n in names}


def _digest_model(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def _digest_data(data) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    for batch in as_batches(data, _FN):
        for t in check_batch(batch, _FN):
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        n += batch[0].shape[0]
    return h.hexdigest()[:16], n


# ---- checkpoint ------------------------------------------------------------------------------------------
def _read_checkpoint(path, settings: dict) -> list:
    if not os.path.exists(path):
        return []
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{_FN}: checkpoint {path!r} cannot be read ({err}); delete it to start afresh") from None
    if not isinstance(saved, dict) or saved.get("format") != _CHECKPOINT_FORMAT:
        raise ValueError(f"{_FN}: {path!r} is not a carfast prune checkpoint; pass another checkpoint path")
    if saved["settings"] != settings:
        diff = sorted(k for k in set(settings) | set(saved["settings"])
                      if settings.get(k) != saved["settings"].get(k))
        raise ValueError(f"{_FN}: checkpoint {path!r} was written by a run with other settings (differ: {diff}); "
                         "resume with the same model, data and arguments, or delete it / pass another path")
    rows = list(saved["history"])
    # an iteration cut short (killed between the removals of one step) is redone from its start
    while rows and sum(r["iteration"] == rows[-1]["iteration"] for r in rows) < rows[-1]["planned"]:
        last = rows[-1]["iteration"]
        rows = [r for r in rows if r["iteration"] != last]
    return rows


class _Run:
    """The state of one pruning run: the current model and each layer's original filter indices."""

    def __init__(self, model, names, targets, data, score_kw, criterion, step, threshold, replay, checkpoint,
                 settings, bar, example, prebuilt):
        self.model, self.names, self.targets, self.data = model, names, targets, data
        self.score_kw, self.criterion, self.step, self.threshold = score_kw, criterion, step, threshold
        self.orig = {n: list(range(target_num_filters(model.get_submodule(n)))) for n in names}
        self.num_filters = {n: len(o) for n, o in self.orig.items()}
        self.replay = collections.deque(replay)
        self.checkpoint, self.settings, self.bar = checkpoint, settings, bar
        self.history: list[dict] = []
        self.stopped = False
        self.iteration = -1
        self.example = example       # one input [1, ...] for the surgery's shape tracing
        self.first_scores = {}       # {layer: LayerScores of its first scoring} (CAR): the class-wise view
        self.prebuilt = prebuilt     # {layer: LayerScorer} on the input model, valid until the first cut

    # -- bookkeeping ---------------------------------------------------------------------------------------
    def record(self, layer, orig_index, ev, remaining, seconds, planned):
        """Append a history row for a removal just made (``planned``: removals chosen in this iteration)."""
        row = {"step": len(self.history), "iteration": self.iteration, "planned": planned, "layer": layer,
               "filter": int(orig_index), "correct": int(ev[0]), "accuracy": ev[0] / ev[2], "loss": ev[1] / ev[2],
               "remaining": remaining, "seconds": seconds}
        self.history.append(row)
        self.bar.update(1)
        if self.checkpoint is not None:
            write_json_atomic(self.checkpoint, {"format": _CHECKPOINT_FORMAT, "settings": self.settings,
                                                "history": self.history})

    def next_replayed(self, layer: str | None = None):
        """The next recorded removal (a history row) when resuming, else None."""
        if not self.replay:
            return None
        row = self.replay.popleft()
        self.history.append(row)
        self.bar.update(1)
        self.iteration = row["iteration"]
        if layer is None:
            return row
        if row["layer"] != layer:
            raise ValueError(f"{_FN}: checkpoint {self.checkpoint!r} removes from {row['layer']!r} where this run "
                             f"removes from {layer!r}; delete it to start afresh")
        return row

    def cut(self, removals: dict):
        """Physically remove {layer: [current indices]} from the current model."""
        removals = {n: ks for n, ks in removals.items() if ks}
        if not removals:
            return
        self.model = remove_filters(self.model, removals, example=self.example)
        self.prebuilt = {}
        for n, ks in removals.items():
            gone = set(ks)
            self.orig[n] = [o for i, o in enumerate(self.orig[n]) if i not in gone]
        for n in self.names:
            if target_num_filters(self.model.get_submodule(n)) != len(self.orig[n]):
                raise ValueError(f"{_FN}: removing filters of {sorted(removals)} also changed layer {n!r} (it lies "
                                 "on their channel chain, e.g. a depthwise conv); prune it on its own")

    def scorer(self, layer: str) -> LayerScorer:
        """A scorer of ``layer`` on the current model."""
        return self.prebuilt.pop(layer, None) or LayerScorer(self.model, layer, self.data, progress=False,
                                                             **self.score_kw)

    # -- sequential ----------------------------------------------------------------------------------------
    def sequential(self):
        for layer in self.names:
            if self.stopped:
                break
            scorer = self.scorer(layer)
            start = list(self.orig[layer])           # scorer index -> original index
            while len(scorer.remaining) > self.targets[layer] and not self.stopped:
                t0 = time.perf_counter()
                row = self.next_replayed(layer)
                if row is not None:
                    scorer.remove(start.index(row["filter"]))
                    continue
                self.iteration += 1
                ranked, known = self.rank_in_layer(scorer, layer, start)
                picks = ranked[:min(self.step, len(scorer.remaining) - self.targets[layer])]
                for j in picks:
                    s = known.pop(j, None) or scorer.score([j])    # the first pick's score is known
                    known.clear()
                    i = s.filters.tolist().index(j)
                    ev = (int(s.correct[i].sum()), float(s.loss_sum[i]), s.num_images)
                    if self.threshold is not None and ev[0] / ev[2] < self.threshold:
                        self.stopped = True
                        break
                    scorer.remove(j)
                    self.record(layer, start[j], ev, len(scorer.remaining), time.perf_counter() - t0, len(picks))
            self.cut({layer: list(scorer.removed)})

    def rank_in_layer(self, scorer, layer, start):
        """Remaining scorer indices, best to remove first; and {index: LayerScores} already known."""
        if self.criterion is None:
            s = scorer.score()
            self.first_scores.setdefault(layer, s)
            order = s.ranking().tolist()
            return order, {order[0]: s}
        now = self.model
        if scorer.removed:     # the criterion sees the model as it is now
            now = remove_filters(self.model, {layer: list(scorer.removed)}, example=self.example)
        imp = _importance(self.criterion, now, layer, self.data, len(scorer.remaining), self.score_kw["process_group"])
        rem = scorer.remaining
        return sorted(rem, key=lambda j: (float(imp[rem.index(j)]), start[j])), {}

    # -- global --------------------------------------------------------------------------------------------
    def global_(self):
        while not self.stopped:
            open_layers = [n for n in self.names if len(self.orig[n]) > self.targets[n]]
            if not open_layers:
                return
            t0 = time.perf_counter()
            row = self.next_replayed()
            if row is not None:
                self.cut({row["layer"]: [self.orig[row["layer"]].index(row["filter"])]})
                continue
            self.iteration += 1
            cands = []       # (key, layer, original index, ev or None)
            for pos, n in enumerate(open_layers):
                if self.criterion is None:
                    s = self.scorer(n).score()
                    if len(self.orig[n]) == self.num_filters[n]:      # intact: indices are the original ones
                        self.first_scores.setdefault(n, s)
                    for i, k in enumerate(s.filters.tolist()):
                        c, l = int(s.correct[i].sum()), float(s.loss_sum[i])
                        cands.append(((-c, l, pos, self.orig[n][k]), n, self.orig[n][k], (c, l, s.num_images)))
                else:
                    imp = _importance(self.criterion, self.model, n, self.data, len(self.orig[n]),
                                      self.score_kw["process_group"])
                    cands += [((float(v), pos, self.orig[n][i]), n, self.orig[n][i], None) for i, v in enumerate(imp)]
            cands.sort(key=lambda c: c[0])
            budget = {n: len(self.orig[n]) - self.targets[n] for n in open_layers}
            picks = []
            for c in cands:
                if len(picks) < self.step and budget[c[1]] > 0:
                    picks.append(c)
                    budget[c[1]] -= 1
            for i, (_, n, o, ev) in enumerate(picks):
                tentative = remove_filters(self.model, {n: [self.orig[n].index(o)]}, example=self.example)
                if i > 0 or ev is None:
                    e = evaluate(tentative, self.data, process_group=self.score_kw["process_group"])
                    ev = (e.correct, e.loss_sum, e.num_images)
                if self.threshold is not None and ev[0] / ev[2] < self.threshold:
                    self.stopped = True
                    return
                self.model, self.prebuilt = tentative, {}
                self.orig[n].remove(o)
                self.record(n, o, ev, len(self.orig[n]), time.perf_counter() - t0, len(picks))


def _importance(criterion, model, layer, data, expected: int, process_group=False) -> torch.Tensor:
    """A baseline criterion's [F] importance; with several processes, its mean over them (each computes it
    on its own shard), so every process ranks the same way."""
    imp = torch.as_tensor(criterion(model, layer, data), dtype=torch.float64).flatten().cpu()
    if process_group is not False and process_group is not None:
        world = torch.distributed.get_world_size(process_group)
        imp = all_reduce_sum([imp], process_group, _FN)[0] / world
    if imp.numel() != expected:
        raise ValueError(f"{_FN}: criterion {getattr(criterion, '__name__', criterion)!r} returned {imp.numel()} "
                         f"scores for {layer!r}, which has {expected} filters; it must return one per filter")
    if not bool(torch.isfinite(imp).all()):
        raise ValueError(f"{_FN}: criterion {getattr(criterion, '__name__', criterion)!r} returned non-finite "
                         f"scores for {layer!r}")
    return imp


def _finetune(model, finetune):
    if callable(finetune):
        out = finetune(model)
        if not isinstance(out, nn.Module):
            raise TypeError(f"{_FN}: finetune must return the fine-tuned nn.Module, got {type(out).__name__}")
        return out
    from carfast.pruning.finetune import finetune as run_finetune
    cfg = dict(finetune)
    return run_finetune(model, cfg.pop("data"), cfg)


def prune(model: nn.Module, layers, data, *, keep, step: int = 1, schedule: str = "sequential",
          criterion="car", max_accuracy_drop: float | None = None, finetune=None, checkpoint=None,
          progress=None, **score_options) -> PruneResult:
    """Greedy pruning of ``layers`` of ``model`` by CAR (or a baseline criterion), then surgery.

    Args:
        model: the trained ``nn.Module`` (never changed).
        layers: a layer name / module, or a list of them (non-coupled Conv2d / Linear, as ``score_layer``).
        data: ``(inputs [N, ...], labels [N])`` or a re-iterable of batches (a list, a DataLoader); the
            images the filters are scored on.
        keep: filters to keep per layer: an int, a fraction in (0, 1], or a dict {layer: int or fraction}.
        step: filters removed per iteration (the best ``step`` of one scoring; faster, less faithful:
            filters that stand in for each other each look unimportant alone, and a coarse step can
            remove both; measured in experiments/RESULTS.md, CAR with step 8 on a 64-filter layer lost to
            the baselines that step 2 beat).
        schedule: "sequential" (layer after layer, as the paper) or "global" (best filter of any layer).
        criterion: "car" (default), a name in ``carfast.criteria.CRITERIA`` ("random", "l1",
            "mean_activation", "apoz", "taylor") or a callable ``(model, layer, data) -> [F]`` importance
            (higher = more important).
        max_accuracy_drop: stop before the removal that would take accuracy (on ``data``) below the
            input model's accuracy minus this (a fraction, e.g. 0.02).
        finetune: None, a callable ``model -> model``, or a dict of ``FinetuneConfig`` fields plus ``data``
            (training data) to fine-tune the pruned model (``carfast.finetune``).
        checkpoint: a JSON path written after every removal; an existing one is resumed.
        progress: None (a bar when stderr is a terminal), True, False, or ``callable(done, total)``.
        **score_options: ``device``, ``batch_size``, ``memory_budget``, ``backend``, ``precision``, ``options``,
            ``process_group`` of ``score_layer`` (``group`` is its deprecated name). ``process_group`` (default:
            the default process group when
            ``torch.distributed`` is initialised; False: this process alone): each process passes its own
            shard of the images; scores and accuracy checks are summed over the processes, so every process
            makes the same removals and returns the same result, equal to one process on all the shards
            (a baseline criterion's importance is averaged over the processes; ``checkpoint`` and
            ``finetune`` are refused). With ``precision="bf16"``/``"fp16"`` accuracies are float32's, but ties in
            accuracy are broken by loss sums carrying the low precision's rounding, so the removal order
            can differ from float32's where two filters tie in accuracy.
    Returns:
        ``PruneResult`` (model, removed, kept, history, summary(), save()).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{_FN}: model must be a torch.nn.Module, got {type(model).__name__}")
    unknown = sorted(set(score_options) - set(_SCORE_KEYS))
    if unknown:
        raise TypeError(f"{_FN}: unexpected argument(s) {unknown}; score options are {list(_SCORE_KEYS)}")
    names = _layer_names(model, layers)
    nums = {n: target_num_filters(model.get_submodule(n)) for n in names}
    targets = _keep_counts(keep, names, nums)
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"{_FN}: step must be a positive int, got {step!r}")
    if schedule not in ("sequential", "global"):
        raise ValueError(f"{_FN}: schedule must be 'sequential' or 'global', got {schedule!r}")
    crit = None if criterion in ("car", None) else get_criterion(criterion)
    crit_name = "car" if crit is None else getattr(crit, "__name__", str(criterion))
    if max_accuracy_drop is not None and (isinstance(max_accuracy_drop, bool) or
                                          not isinstance(max_accuracy_drop, (int, float)) or
                                          not 0 <= max_accuracy_drop <= 1):
        raise ValueError(f"{_FN}: max_accuracy_drop must be a fraction in [0, 1] (0.02 = two points), "
                         f"got {max_accuracy_drop!r}")
    if finetune is not None and not callable(finetune):
        if not isinstance(finetune, dict):
            raise TypeError(f"{_FN}: finetune must be None, a callable(model) -> model, or a dict config with "
                            f"'data', got {type(finetune).__name__}")
        if "data" not in finetune:
            raise ValueError(f"{_FN}: finetune config needs 'data': the training (inputs, labels) or batches, "
                             "e.g. carfast.train_data.cifar10_train(path)")
    if isinstance(data, collections.abc.Iterator):
        raise ValueError(f"{_FN}: data is a one-shot iterator, but pruning reads it many times; pass "
                         "(inputs, labels), a list of batches or a DataLoader")
    first = next(iter(as_batches(data, _FN)), None)
    if first is None:
        raise ValueError(f"{_FN}: data holds no images; pass at least one (inputs, labels) pair")
    example = check_batch(first, _FN)[0][:1]
    work = copy.deepcopy(model).eval()
    # fail early for a layer that cannot be scored (coupled, untraceable consumers...): no data pass; the
    # scorers are kept for use while the model is still the input model
    # several processes: the scores and every accuracy check are summed over the group, so each process
    # makes the same removals (each scores its own shard of the images)
    group = resolve_group(process_group_argument(score_options.pop("process_group", None),
                                                 score_options.pop("group", UNSET), _FN), _FN)
    if group is not None and checkpoint is not None:
        raise ValueError(f"{_FN}: checkpoint= is not supported with several processes (torch.distributed); "
                         "pass process_group=False to prune on each process alone, or drop checkpoint")
    if group is not None and finetune is not None:
        raise ValueError(f"{_FN}: finetune= with several processes would fine-tune each process's copy on its own "
                         "data; fine-tune result.model yourself (e.g. with DistributedDataParallel)")
    score_options = {**score_options, "process_group": group if group is not None else False}
    prebuilt = {n: LayerScorer(work, n, data, progress=False, **score_options) for n in names}
    base = evaluate(work, data, process_group=score_options["process_group"])
    threshold = None if max_accuracy_drop is None else base.accuracy - max_accuracy_drop
    settings = {"layers": names, "keep": targets, "step": step, "schedule": schedule, "criterion": crit_name,
                "max_accuracy_drop": max_accuracy_drop, "num_images": base.num_images,
                "input_shape": list(example.shape), "backend": score_options.get("backend", "auto"),
                "precision": score_options.get("precision", "fp32")}
    replay = []
    if checkpoint is not None:
        checkpoint = os.fspath(checkpoint)
        settings["model_digest"] = _digest_model(model)
        settings["data_digest"] = _digest_data(data)[0]
        replay = _read_checkpoint(checkpoint, settings)
    bar = Progress(progress, sum(nums[n] - targets[n] for n in names), "pruning", unit="filters")
    run = _Run(work, names, targets, data, score_options, crit, step, threshold, replay, checkpoint, settings, bar,
               example, prebuilt)
    run.sequential() if schedule == "sequential" else run.global_()
    bar.close()
    example = example.to(model_device(run.model))
    sizes = {"before": ModelStats.of(model, example), "after": ModelStats.of(run.model, example)}
    stats = {when: {"params": st.params, "macs": st.macs} for when, st in sizes.items()}
    removed = {n: [r["filter"] for r in run.history if r["layer"] == n] for n in names}
    result = PruneResult(run.model, removed, {n: sorted(run.orig[n]) for n in names}, run.history,
                         {"accuracy": base.accuracy, "loss": base.loss, "num_images": base.num_images}, settings,
                         stats, scores=run.first_scores)
    if finetune is not None:
        result.model = _finetune(result.model, finetune)
        result.finetuned_accuracy = evaluate(result.model, data).accuracy
        result.settings["finetune"] = ({k: v for k, v in finetune.items() if k != "data"}
                                       if isinstance(finetune, dict) else getattr(finetune, "__name__", "callable"))
    return result
