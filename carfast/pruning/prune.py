"""Greedy CAR pruning (Abbasi-Asl and Yu): score, remove the channel that costs least, re-score, repeat.

``prune`` checks its arguments into a ``config.PruneConfig`` (a name whose channels are coupled with
other layers' means its coupling group), measures the input model, and runs ``loop.GreedyRun``
(sequential or global schedule, for CAR and for the baseline criteria of ``criteria.py`` alike), with
checkpoints (``checkpoint.py``); then surgery, the optional fine-tune, and the ``PruneResult``.
``tests/naive.py`` holds the naive greedy loop (one full network run per candidate) this must equal.
"""
from __future__ import annotations

import copy
import dataclasses
import os

import torch
from torch import nn

from carfast.batching import eval_mode, model_device
from carfast.distributed import UNSET, process_group_argument, resolve_group
from carfast.pruning.checkpoint import digest_data, digest_model, read_checkpoint
from carfast.pruning.config import PruneConfig
from carfast.pruning.eta import suffix_seconds
from carfast.pruning.evaluate import evaluate
from carfast.pruning.loop import GreedyRun
from carfast.pruning.result import PruneResult
from carfast.scoring import LayerScorer, ScoreOptions
from carfast.scoring.checks import warn_near_chance
from carfast.surgery.measure import ModelStats

__all__ = ["prune"]

_FN = "prune"


#: keys of a ``finetune=`` dict that are ``carfast.finetune.finetune``'s arguments, not ``FinetuneConfig`` fields
_FINETUNE_ARGS = ("data", "teacher", "calibrate", "checkpoint")


def _finetune(model, finetune, original):
    """The pruned ``model`` fine-tuned as ``finetune`` says; a dict with ``distill`` > 0 and no ``teacher``
    distils from ``original``, the model before pruning."""
    if callable(finetune):
        out = finetune(model)
        if not isinstance(out, nn.Module):
            raise TypeError(f"{_FN}: finetune must return the fine-tuned nn.Module, got {type(out).__name__}")
        return out
    from carfast.finetune import finetune as run_finetune
    cfg = {k: v for k, v in finetune.items() if k not in _FINETUNE_ARGS}
    args = {k: finetune[k] for k in _FINETUNE_ARGS[1:] if k in finetune}
    if cfg.get("distill") and "teacher" not in args:
        args["teacher"] = original
    return run_finetune(model, finetune["data"], cfg, **args)


def _quiet_scorers(config) -> None:
    """The scorers of this run do not warn of near-chance accuracy (``_check_chance`` does, once)."""
    options = config.score_options.get("options")
    if options is None or isinstance(options, ScoreOptions):
        config.score_options["options"] = dataclasses.replace(options or ScoreOptions(), warn_near_chance=False)


def _check_chance(work, example, base, topk) -> None:
    """Warn once (``errors.NearChanceWarning``) when the input model's accuracy on the data is near chance."""
    with eval_mode(work), torch.no_grad():
        classes = work(example.to(model_device(work))).shape[-1]
    warn_near_chance(base.accuracy, base.num_images, classes, _FN, topk, stacklevel=4)   # at prune's caller


def prune(model: nn.Module, layers, data, *, keep, step: int = 1, schedule: str = "sequential",
          criterion="car", rule=None, search="exact", max_accuracy_drop=None, finetune=None, checkpoint=None,
          progress=None, **score_options) -> PruneResult:
    """Greedy pruning of ``layers`` of ``model`` by CAR (or a baseline criterion), then surgery.

    Args:
        model: the trained ``nn.Module`` (never changed).
        layers: a layer name / module, or a list of them (Conv2d / Linear). A layer whose channels are
            coupled with other layers' (a residual stream: a ResNet's stem or a block's second conv) means
            its coupling group, as does ``carfast.Group(layer)``: the group's channels are scored together
            (``score_group``) and cut from every member (``remove_groups``); name a group once, by any of
            its layers.
        data: ``(inputs [N, ...], labels [N])`` or a re-iterable of batches (a list, a DataLoader, a
            Dataset); the images the channels are scored on.
        keep: what to KEEP per layer (not what to remove): an int (filters, or a group's channels), a
            fraction in (0, 1] of them, or a dict {layer: int or fraction}. Torch-Pruning's
            ``pruning_ratio`` and ``torch.nn.utils.prune``'s ``amount`` are the share removed:
            ``keep = 1 - pruning_ratio``.
        step: channels removed per iteration (the best ``step`` of one scoring; faster, less faithful:
            channels that stand in for each other each look unimportant alone, and a coarse step can
            remove both; measured in experiments/RESULTS.md, CAR with step 8 on a 64-filter layer lost to
            the baselines that step 2 beat).
        schedule: "sequential" (layer after layer, as the paper) or "global" (best channel of any layer).
        criterion: "car" (default), a name in ``carfast.criteria.CRITERIA`` ("random", "l1",
            "mean_activation", "apoz", "taylor") or a callable ``(model, layer, data) -> [F]`` importance
            (higher = more important), re-evaluated on the smaller model at each iteration; one with
            ``fixed_order = True`` (as "random") is drawn once per layer and removed in its order.
        rule: CAR's selection rule, which removal greedy CAR picks (``carfast.scoring.selection``):
            "accuracy" (the paper's: most images still correct), "lcb" (a lower confidence bound of that,
            from the images each removal flips either way: resists the winner's curse of picking the
            luckiest of many noisy counts) or "loss" (smallest loss); None: ``DEFAULT_RULE``. Measured on
            held-out images in experiments/RESULTS.md.
        search: how CAR finds its choice at each step: "exact" (default: every remaining channel scored on
            every image) or "race" / ``carfast.Race(delta=..., epsilon=..., block=..., seed=...)``: the
            images are visited in blocks in a seeded random order and the channels confidently worse than
            the best are dropped after each block; the channels left are scored on every image and chosen
            among by their exact keys, so every recorded score is exact. Under the bound's assumption (a
            normal approximation, ``carfast.scoring.race``) a step drops its best channel with probability
            at most ``delta`` (default 0.05); ``epsilon`` > 0 also stops early once the best so far is within
            epsilon of the rest. Rules "loss" and "accuracy"; each history row counts its candidate-image
            ``evaluations`` and the ``exhaustive`` ones the exact search makes. Measured in
            experiments/RESULTS.md.
        max_accuracy_drop: an accuracy budget: a fraction (0.02 = two points) for every layer, or a dict
            {layer: fraction or None}. A layer stops before the removal that would take accuracy (on
            ``data``) below the input model's minus its budget; the other layers go on.
            ``PruneResult.stops`` (and the summary) say which layers stopped, where and why.
        finetune: None, a callable ``model -> model``, or a dict of ``FinetuneConfig`` fields plus ``data``
            (training data) to fine-tune the pruned model (``carfast.finetune``), and optionally
            ``calibrate`` (images whose BatchNorm statistics are re-estimated afterwards), ``checkpoint``
            (a path: resumable) and ``teacher``; with ``distill`` > 0 the teacher defaults to ``model``,
            the network before pruning.
        checkpoint: a JSON path written after every removal; an existing one is resumed (a sequential run
            may be continued to a smaller ``keep``: the removals it already made are replayed).
        progress: None (a bar on a terminal, periodic lines elsewhere), True, False, or
            ``callable(done, total)``.
        **score_options: the score options of ``score_layer`` (``carfast.scoring.settings.ScoreSettings``) but
            ``progress``: ``device``, ``batch_size``, ``memory_budget``, ``backend``, ``precision``, ``options``,
            ``process_group``, ``topk`` (``group`` is its deprecated name); ``topk`` (default
            1) is the accuracy CAR counts and ``max_accuracy_drop`` and the history report (top-5: 5). ``process_group``
            (default: the default process group when ``torch.distributed`` is initialised; False: this
            process alone): each process passes its own shard of the images; scores and accuracy checks
            are summed over the processes, so every process makes the same removals and returns the same
            result, equal to one process on all the shards (a baseline criterion's importance is averaged
            over the processes; ``checkpoint`` and ``finetune`` are refused). With ``precision="bf16"`` /
            ``"fp16"`` the counts are float32's and the counting rules ("accuracy", "lcb") settle their ties
            with float32 loss sums of the tied candidates, so the removals are float32's; the "loss" rule
            needs float32 (refused otherwise: low-precision loss sums would decide).
    Returns:
        ``PruneResult`` (model, removed, kept, history, stops, summary(), save()).
    """
    pg = process_group_argument(score_options.pop("process_group", None), score_options.pop("group", UNSET), _FN)
    config = PruneConfig.build(model, layers, data, keep=keep, step=step, schedule=schedule, criterion=criterion,
                               rule=rule, max_accuracy_drop=max_accuracy_drop, finetune=finetune, checkpoint=checkpoint,
                               score_options=score_options, search=search)
    # several processes: the scores and every accuracy check are summed over the group, so each process
    # makes the same removals (each scores its own shard of the images)
    group = resolve_group(pg, _FN)
    if group is not None and checkpoint is not None:
        raise ValueError(f"{_FN}: checkpoint= is not supported with several processes (torch.distributed); "
                         "pass process_group=False to prune on each process alone, or drop checkpoint")
    if group is not None and finetune is not None:
        raise ValueError(f"{_FN}: finetune= with several processes would fine-tune each process's copy on its own "
                         "data; fine-tune result.model yourself (e.g. with DistributedDataParallel)")
    config.score_options["process_group"] = group if group is not None else False
    _quiet_scorers(config)     # prune checks the input model's accuracy for near chance once, below
    work = copy.deepcopy(model).eval()
    # scorers built now fail early (before any data pass) and serve while the model is still the input model
    prebuilt = {t.name: LayerScorer(work, t.spec, data, progress=False, **config.score_options)
                for t in config.targets}
    topk = config.score_options.get("topk", 1)
    base = evaluate(work, data, process_group=config.score_options["process_group"], topk=topk)
    _check_chance(work, config.example, base, topk)
    settings = {"layers": config.names, "groups": [t.name for t in config.targets if t.group],
                "keep": {t.name: t.keep for t in config.targets}, "step": config.step, "schedule": config.schedule,
                "criterion": config.criterion_name, "rule": config.rule if config.criterion is None else None,
                "max_accuracy_drop": {t.name: t.max_drop for t in config.targets},
                "num_images": base.num_images, "input_shape": list(config.example.shape),
                "backend": config.score_options.get("backend", "auto"),
                "precision": config.score_options.get("precision", "fp32")}
    if topk != 1:     # (absent for top-1, as in checkpoints written before top-k existed)
        settings["topk"] = topk
    if config.search is not None:     # (absent for the exact search, as in checkpoints written before the race)
        settings["search"] = {"method": "race", **config.search.settings()}
    replay = []
    if checkpoint is not None:
        config.checkpoint = os.fspath(checkpoint)
        settings["model_digest"], settings["data_digest"] = digest_model(model), digest_data(data)
        replay = read_checkpoint(config.checkpoint, settings)
    # what one unit of each target's work costs, relative to the others (for the time left; eta.py)
    weights = dict.fromkeys(config.names, 1) if config.criterion is not None else \
        suffix_seconds(work, config.example.to(model_device(work)), config.names,
                       closed_form={n for n, s in prebuilt.items() if s.method == "closed_form"})
    run = GreedyRun(config, work, data, base, replay, settings, progress, prebuilt, weights)
    run.sequential() if config.schedule == "sequential" else run.global_()
    run.bar.close()
    example = config.example.to(model_device(run.model))
    sizes = {"before": ModelStats.of(model, example), "after": ModelStats.of(run.model, example)}
    stats = {when: {"params": st.params, "macs": st.macs} for when, st in sizes.items()}
    removed = {n: [r["filter"] for r in run.history if r["layer"] == n] for n in config.names}
    result = PruneResult(run.model, removed, {n: sorted(run.orig[n]) for n in config.names}, run.history,
                         {"accuracy": base.accuracy, "loss": base.loss, "num_images": base.num_images}, settings,
                         stats, scores=run.first_scores, stops=run.stops)
    if finetune is not None:
        result.model = _finetune(result.model, finetune, model)
        result.finetuned_accuracy = evaluate(result.model, data, topk=topk).accuracy
        result.settings["finetune"] = (
            {k: v for k, v in finetune.items() if k not in _FINETUNE_ARGS or k == "checkpoint"}
            if isinstance(finetune, dict) else getattr(finetune, "__name__", "callable"))
    return result
