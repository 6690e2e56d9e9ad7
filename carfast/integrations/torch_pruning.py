"""CAR as a Torch-Pruning importance: ``CARImportance`` (``pip install carfast[torch-pruning]``).

Torch-Pruning (``torch_pruning``) finds the channels that must be removed together (its dependency
*groups*) and asks an importance criterion for one score per channel of each group; a step then removes
the lowest-scored channels of each group (or, with ``global_pruning=True``, the lowest across groups).

By default ``CARImportance`` carries the paper's greedy loop into that step: for each group it runs
carfast's greedy CAR inside the group (score every channel's removal, remove the one that costs least,
re-score with the cached state updated in place, repeat; as ``carfast.prune`` does) and returns scores
that order the channels by greedy removal order, so Torch-Pruning's "lowest k" are greedy CAR's first
k removals. The score of the j-th removal is the accuracy the group's greedy run had lost, on the data
given, once it was made (a fraction of the images; its running maximum, plus j / (1e4 N) so the order is
strict): comparable across groups scored on the same images, which is what ``global_pruning`` needs.
The greedy runs only as far as the step needs when the importance knows the pruner
(``CARImportance(...).bind(pruner)``; with ``global_pruning`` twice the step's share, as a group may
lose more than its share), else as far as ``depth`` says, else through the whole group; the channels it
does not reach score above all of its removals, in their single-removal CAR order. Bound to a pruner
that prunes each group by its own ratio (not ``global_pruning``), the groups of one step are scored as
the paper's sequential schedule scores layers: each on a copy of the model from which the groups
scored before it in this step have already lost the channels the step will remove from them.

``greedy=False`` scores each channel alone (one ``score_layer`` of the layer or its ``Group``): cheaper, but
channels that stand in for each other each look unimportant alone, and a step that removes many of
them at once removes them together (measured in benchmarks/RESULTS.md: far worse than magnitude).

A depthwise conv on a group's way (MobileNet's expand -> depthwise -> squeeze-and-excitation) is a
producer to Torch-Pruning (it deletes its output channels with the group's) and a per-channel op to carfast
(its weight rows go with the channels they carry): the same deletion, so the producers are compared without
depthwise convs, and the rows deleted from each depthwise conv are compared with the channels.

A group carfast cannot score (an op it cannot follow, a layer making the logits, a Torch-Pruning group
that is not carfast's: other producers, or, probed on its first and last channel, other channels of a
Conv2d / Linear or other rows of a depthwise conv deleted, as Torch-Pruning 1.6.1 does behind a flip of
the channels, a selective kernel's attention view or a depthwise conv with a channel multiplier) is not
scored: ``CARImportance`` returns None for it (Torch-Pruning then leaves it alone) or, with ``fallback=``
another importance, that importance's scores, and warns with the groups affected (all of them at once
when bound to the pruner, checked before any scoring).

Progress (``progress=``, as ``score_layer``'s: None a bar on a terminal or lines in a log, False nothing,
a callable ``(done, total)``) counts the (candidate channel, image) pairs scored: bound to a pruner, over
each step's groups (total: every group the step will ask about, greedy as far as it will go), else over
the one group of each call; the time left is the elapsed time per pair times the pairs left.

The CIFAR ResNets' parameter-free padding shortcut (``carfast.models.OptionAShortcut``) needs a pruner
of its own in Torch-Pruning: without one, Torch-Pruning takes the padding for an element-wise op and
merges all three stages into one group with mismatched channel indices. ``channel_map_pruners(model)``
gives the ``customized_pruners`` that make Torch-Pruning's groups carfast's (one per stage)::

    import torch_pruning as tp
    from carfast.integrations.torch_pruning import CARImportance, channel_map_pruners
    imp = CARImportance((x, y))
    pruner = tp.pruner.BasePruner(model, example, imp, pruning_ratio=0.3, iterative_steps=2,
                                  ignored_layers=[model.linear],
                                  customized_pruners=channel_map_pruners(model))
    imp.bind(pruner)                 # optional: greedy only as far as each step needs
    for _ in range(2):
        pruner.step()
"""
from __future__ import annotations

import copy
import math
import warnings

import torch
from torch import nn

from carfast.batching import as_batches, check_batch, eval_mode, model_device
from carfast.graph import analyze_units, is_channel_map
from carfast.graph.groups import members_of
from carfast.graph.target import target_spec
from carfast.integrations.tp_internals import asked, graph_of, layer_name
from carfast.progress import Progress
from carfast.scoring.checks import count_images
from carfast.scoring.race import check_race_rule, check_search, race_scores
from carfast.scoring.scorer import LayerScorer, score_layer
from carfast.scoring.selection import DEFAULT_RULE, check_rule, check_rule_precision, score_by_rule, settled_keys
from carfast.scoring.settings import SCORE_OPTIONS
from carfast.surgery import remove_filters
from carfast.surgery.slicers import remap_channel_map

try:
    import torch_pruning as tp
except ImportError as err:   # the rest of carfast works without it
    raise ImportError("carfast.integrations.torch_pruning needs Torch-Pruning: pip install 'carfast[torch-pruning]' "
                      "(or pip install torch-pruning)") from err

__all__ = ["CARImportance", "ChannelMapPruner", "channel_map_pruners", "car_importance", "greedy_importance"]

_FN = "CARImportance"
_OPTIONS = set(SCORE_OPTIONS) - {"group"}     # the score options (ScoreSettings) but the deprecated name


def car_importance(scores, rank_by: str = "accuracy") -> torch.Tensor:
    """[F] float64 importance of ``LayerScores``, higher = more important, comparable across layers scored
    on the same images.

    rank_by "accuracy": the accuracy drop (``scores.car``) plus a tie-break below one image,
    0.5 + atan(loss increase) / pi over N, so an accuracy tie goes to the larger loss increase;
    "loss": the mean loss increase alone (smoother on few images, see benchmarks/RESULTS.md).
    """
    if rank_by == "loss":
        return scores.loss_increase.double()
    n = scores.num_images
    drop = (scores.base_correct.sum() - scores.correct.sum(1)).double()        # images lost, an integer
    tie = 0.5 + torch.atan(scores.loss_increase) / math.pi                     # in (0, 1)
    return (drop + tie) / n


def greedy_importance(scorer, steps: int, rule: str = DEFAULT_RULE, process_group=False, search=None) -> torch.Tensor:
    """[F] float64 importance of a prepared ``LayerScorer``'s channels from greedy CAR
    inside it (see the module docstring), F its channels; the scorer is left with the removals made.

    The greedy makes ``steps`` removals (at most F - 1) under the selection ``rule``; removal j scores
    its running maximum accuracy drop + j / (1e4 N); the channels not removed score above all of them:
    the last removal's score + 1 / N + their single-removal ``car_importance`` in the last scoring,
    shifted to start at zero. ``search``: None (exact) or a ``carfast.Race``: every removal but the last is
    raced (``scoring.race``); the last scoring is exact, since it orders every channel left.
    """
    F = scorer.num_filters
    imp = torch.zeros(F, dtype=torch.float64)
    base = worst = None
    last = None
    n_steps = min(steps, F - 1)
    for j in range(n_steps):
        if search is not None and j < n_steps - 1:
            [s], _ = race_scores([(scorer, scorer.remaining)], rule, search, process_group, str(j))
            keys = settled_keys(scorer, s, rule)
        else:
            s, keys = score_by_rule(scorer, rule, process_group)
        filters = s.filters.tolist()
        i = min(range(len(filters)), key=lambda i: (keys[i], filters[i]))
        if base is None:
            base, n = int(s.base_correct.sum()), s.num_images
        drop = (base - int(s.correct[i].sum())) / n
        worst = drop if worst is None else max(worst, drop)
        imp[filters[i]] = worst + j / (1e4 * n)
        scorer.remove(filters[i])
        last = (s, i)
    if last is None:                       # no greedy step: one scoring orders them all
        return car_importance(scorer.score())
    s, i = last                            # the last scoring also scored the channels left
    rest = [p for p, f in enumerate(s.filters.tolist()) if p != i]
    vals = car_importance(s)[rest]
    top = float(imp[s.filters[i]])         # the last removal's score, the highest of the greedy's
    imp[s.filters[rest]] = top + 1.0 / s.num_images + (vals - vals.min())
    return imp


class CARImportance(tp.importance.Importance):
    """A ``torch_pruning`` importance: greedy CAR within each group, or single-removal CAR (see the module
    docstring).

    Args:
        data: ``(inputs, labels)`` or an iterable of batches, as for ``score_layer``.
        greedy: True (default): scores that order each group's channels by greedy CAR's removal order;
            False: each channel's own CAR (one scoring).
        depth: how far the greedy goes in each group: an int (removals) or a float (share of the
            group's channels); None: what the bound pruner's step needs (``bind``), else the whole group.
        rule: greedy CAR's selection rule ("accuracy", "lcb", "loss"; ``carfast.scoring.selection``);
            None: ``DEFAULT_RULE``, as ``carfast.prune``.
        search: how the greedy finds each removal: "exact" (default), "race" or a ``carfast.Race`` (see
            ``carfast.prune``; rules "loss" and "accuracy").
        rank_by: with ``greedy=False``: "accuracy" (the accuracy drop, ties broken by the loss increase)
            or "loss" (the loss increase alone); see ``car_importance``.
        fallback: None (default: a group carfast cannot score is left alone: None is returned) or a
            Torch-Pruning importance (e.g. ``tp.importance.MagnitudeImportance(p=1)``) that scores it.
        **score_options: passed to ``score_layer`` (device, batch_size, memory_budget,
            backend, precision, process_group, options, topk: the top-k accuracy CAR counts), but
            ``progress``: CARImportance's own, over the groups (see the module docstring).
    ``last_scores`` holds the ``LayerScores`` of the last group scored alone (greedy=False); ``skipped``
    {group root: why} the groups carfast could not score.
    """

    def __init__(self, data, greedy: bool = True, depth=None, rule: str | None = None, rank_by: str = "accuracy",
                 fallback=None, search="exact", **score_options):
        if rank_by not in ("accuracy", "loss"):
            raise ValueError(f"{_FN}: rank_by must be 'accuracy' (the accuracy drop, ties broken by the loss "
                             f"increase) or 'loss' (the loss increase), got {rank_by!r}")
        if depth is not None and (isinstance(depth, bool) or not isinstance(depth, (int, float)) or depth < 0
                                  or (isinstance(depth, float) and depth > 1)):
            raise ValueError(f"{_FN}: depth must be None, an int number of removals >= 0 or a float share of a "
                             f"group's channels in [0, 1], got {depth!r}")
        if fallback is not None and not callable(fallback):
            raise TypeError(f"{_FN}: fallback must be None or a Torch-Pruning importance (callable on a group), "
                            f"got {type(fallback).__name__}")
        unknown = set(score_options) - _OPTIONS
        if unknown:
            raise TypeError(f"{_FN}: unknown score options {sorted(unknown)}; accepted: {sorted(_OPTIONS)}")
        self.greedy, self.depth, self.rank_by, self.fallback = bool(greedy), depth, rank_by, fallback
        self.rule = DEFAULT_RULE if rule is None else check_rule(rule, _FN)
        if greedy:
            check_rule_precision(self.rule, score_options.get("precision"), _FN)
        self.search = check_search(search, _FN)
        check_race_rule(self.search, self.rule, _FN)
        self.data = data
        self.progress = score_options.pop("progress", None)
        self.options = score_options
        self.last_scores = None
        self.pruner = None
        self.skipped: dict[str, str] = {}
        self._initial: dict[str, int] = {}     # {group root: channels when first seen} (the step's baseline)
        self._verdicts: dict[str, tuple] = {}   # {group root: (why carfast cannot score it or None, coupled)}
        self._checked = False
        self._example_input = None
        self._shadow, self._shadow_step = None, None   # bound, local pruning: this step's removals so far
        self._bar, self._bar_step = None, None         # the progress of this step's groups (bound) or call

    def bind(self, pruner) -> "CARImportance":
        """Let the greedy run only as far as ``pruner``'s steps need, and check every group it will ask
        about before scoring any (one warning lists those carfast cannot score). Returns self."""
        self.pruner = pruner
        return self

    # -- which groups carfast can score ----------------------------------------------------------------------
    def _example(self) -> torch.Tensor:
        """One input [1, ...] for the channel-flow analysis, read from the data once (it may be a DataLoader)."""
        if self._example_input is None:
            self._example_input = check_batch(next(iter(as_batches(self.data, _FN))), _FN)[0][:1]
        return self._example_input

    def _verdict(self, DG, layer: str, producers: list[str], example) -> tuple:
        """(None when carfast scores Torch-Pruning's group of ``layer`` as Torch-Pruning means it, else why
        not; whether carfast scores it as a coupling group)."""
        model = DG.model
        if layer not in self._verdicts:
            group = False
            try:
                with eval_mode(model), torch.no_grad():
                    flow, group = analyze_units(model, layer, example.to(model_device(model)), _FN)
                found = sorted(p.op.name for p in flow.producers if _producer(p.op.target))
                why = f"Torch-Pruning's group has producers {producers}, carfast's {found}" if found != producers \
                    else _index_mismatch(DG, model.get_submodule(layer), flow)
            except ValueError as err:
                why = str(err).split("\n")[0]
            if why is not None and why.startswith("Torch-Pruning's group") and \
                    any(is_channel_map(m) for m in model.modules()):
                raise ValueError(f"{_FN}: {why}; for channel-padding shortcuts pass customized_pruners="
                                 "channel_map_pruners(model) to the pruner")
            self._verdicts[layer] = (why, group)
        return self._verdicts[layer]

    def _check_all(self, DG) -> None:
        """Bound to a pruner: check every group it will ask about, once, and warn with the unscorable ones."""
        p = self.pruner
        self._checked = True
        example, bad = self._example(), {}
        for group in DG.get_all_groups(ignored_layers=p.ignored_layers, root_module_types=p.root_module_types):
            root = group[0].dep.target.module
            if not isinstance(root, (nn.Conv2d, nn.Linear)) or not DG.is_out_channel_pruning_fn(group[0].dep.handler):
                continue
            why = self._verdict(DG, layer_name(DG, root), _producers(DG, group), example)[0]
            if why is not None:
                bad[layer_name(DG, root)] = why
        self._warn(bad)

    def _warn(self, bad: dict) -> None:
        new = {k: v for k, v in bad.items() if k not in self.skipped}
        if not new:
            return
        self.skipped.update(new)
        what = "scored by the fallback importance" if self.fallback is not None else "left unpruned (None)"
        warnings.warn(f"{_FN}: carfast cannot score {len(new)} group(s), {what}: "
                      + "; ".join(f"{k}: {v}" for k, v in new.items()), stacklevel=3)

    # -- how far the greedy goes -------------------------------------------------------------------------------
    def _steps(self, layer: str, root: nn.Module, F: int) -> int:
        """The greedy's removals in ``layer``'s group of F channels (remembering F as its first size)."""
        self._initial.setdefault(layer, F)
        return self._depth_of(layer, root, F)

    def _depth_of(self, layer: str, root: nn.Module, F: int) -> int:
        if isinstance(self.depth, float):
            return round(self.depth * F)
        if self.depth is not None:
            return self.depth
        p = self.pruner
        if p is None:
            return F - 1
        ratio = min(1.0, p.get_target_pruning_ratio(root) * (2 if p.global_pruning else 1))
        need = max(0, F - int(self._initial.get(layer, F) * (1 - ratio)))
        if p.round_to and need:                # Torch-Pruning rounds the channels left down to a multiple
            need = F - (F - need) // p.round_to * p.round_to
        return need

    @torch.no_grad()
    def __call__(self, group):
        DG = graph_of(group)
        model = DG.model
        root, idxs = group[0].dep.target.module, [int(i) for i in group[0].idxs]
        if not DG.is_out_channel_pruning_fn(group[0].dep.handler) or not isinstance(root, (nn.Conv2d, nn.Linear)):
            raise ValueError(f"{_FN}: the group's root {type(root).__name__} is not a Conv2d / Linear losing output "
                             "channels; carfast scores output channels (use root_module_types=[nn.Conv2d, nn.Linear])")
        if self.pruner is not None and not self._checked:
            self._check_all(DG)
        layer = layer_name(DG, root)
        why, coupled = self._verdict(DG, layer, _producers(DG, group), self._example())
        if why is not None:
            self._warn({layer: why})
            return None if self.fallback is None else self.fallback(group)
        bar = self._progress_bar(DG, layer, root, len(idxs))
        try:
            return self._score(model, layer, root, coupled, _Forward(bar))[idxs].float()
        finally:
            if self.pruner is None or (bar.total is not None and bar.done >= bar.total):
                bar.close()

    def _score(self, model, layer: str, root: nn.Module, coupled: bool, progress) -> torch.Tensor:
        """[F] float64 importance of the F channels of ``layer``'s group (a scorable one), scorers reporting
        their pairs to ``progress``."""
        if not self.greedy:
            scores = score_layer(model, target_spec(layer, coupled), self.data, progress=progress, **self.options)
            self.last_scores = scores
            return car_importance(scores, self.rank_by)
        sequential = self.pruner is not None and not self.pruner.global_pruning and self.depth is None
        if sequential and self._shadow_step != self.pruner.current_step:   # a new step: a fresh copy
            self._shadow, self._shadow_step = copy.deepcopy(model).eval(), self.pruner.current_step
        scored = self._shadow if sequential else model
        scorer = LayerScorer(scored, target_spec(layer, coupled), self.data, progress=progress, **self.options)
        steps = self._steps(layer, root, scorer.num_filters)
        imp = greedy_importance(scorer, steps, self.rule, scorer.process_group, self.search)
        if sequential and scorer.removed:      # what this step will remove, cut before the next group is scored
            self._shadow = remove_filters(self._shadow, {target_spec(layer, coupled): list(scorer.removed)[:steps]})
        return imp

    # -- progress ----------------------------------------------------------------------------------------------
    def _progress_bar(self, DG, layer: str, root: nn.Module, F: int) -> Progress:
        """The progress this call's scorings add to: bound, the step's (made at its first call), else its own."""
        p = self.pruner
        if p is None:
            return Progress(self.progress, self._pairs(self._candidates(layer, root, F)),
                            f"CAR importance of {layer}")
        if self._bar is None or self._bar_step != p.current_step:
            if self._bar is not None:
                self._bar.close()
            self._bar_step = p.current_step
            self._bar = Progress(self.progress, self._pairs(self._step_candidates(DG)),
                                 f"CAR importance, step {p.current_step}")
        return self._bar

    def _candidates(self, layer: str, root: nn.Module, F: int) -> int:
        """Candidate channels this importance scores in a group of F channels: one scoring of them all, or
        the greedy's scorings of F, F - 1, ... channels."""
        if not self.greedy:
            return F
        s = min(self._depth_of(layer, root, F), F - 1)
        return s * F - s * (s - 1) // 2 if s > 0 else F

    def _step_candidates(self, DG) -> int:
        """Candidate channels of every group the bound pruner's step will ask this importance to score
        (the groups it has not pruned to its limit, that carfast can score)."""
        p, example, total = self.pruner, self._example(), 0
        for group in DG.get_all_groups(ignored_layers=p.ignored_layers, root_module_types=p.root_module_types):
            root = group[0].dep.target.module
            if not isinstance(root, (nn.Conv2d, nn.Linear)) or not DG.is_out_channel_pruning_fn(group[0].dep.handler) \
                    or not asked(p, group):
                continue
            layer = layer_name(DG, root)
            if self._verdict(DG, layer, _producers(DG, group), example)[0] is None:
                total += self._candidates(layer, root, len(group[0].idxs))
        return total

    def _pairs(self, candidates: int) -> int | None:
        """(candidate, image) pairs of scoring ``candidates`` on the data; None when the images are not counted."""
        n = count_images(self.data)
        return None if n is None else candidates * n


class _Forward:
    """A scorer's ``progress`` callable: adds the pairs each of its scorings reports to ``bar`` (a scoring
    reports its pairs done so far; fewer than the last report means a new scoring, from zero)."""

    def __init__(self, bar: Progress):
        self.bar, self.seen = bar, 0

    def __call__(self, done: int, total: int | None) -> None:
        if done < self.seen:
            self.seen = 0
        if done > self.seen:
            self.bar.update(done - self.seen)
        self.seen = done


def _producers(DG, group) -> list[str]:
    """The Conv2d / Linear layers of a Torch-Pruning group that lose output channels, by name, depthwise
    convs left out (``_producer``)."""
    return sorted({layer_name(DG, dep.target.module) for dep, _ in group if DG.is_out_channel_pruning_fn(dep.handler)
                   and _producer(dep.target.module)})


def _depthwise(m) -> bool:
    """A Conv2d carfast treats as depthwise (groups == in_channels > 1, out_channels a multiple): per-channel
    on a group's way, its weight rows going with the channels they carry."""
    return isinstance(m, nn.Conv2d) and 1 < m.groups == m.in_channels and m.out_channels % m.in_channels == 0


def _producer(m) -> bool:
    """A Conv2d / Linear whose output channels count as a group's producer on both sides: not a depthwise
    conv (Torch-Pruning's producer, carfast's per-channel op: compared by ``_index_mismatch`` instead)."""
    return isinstance(m, (nn.Conv2d, nn.Linear)) and not _depthwise(m)


def _index_mismatch(DG, root: nn.Module, flow) -> str | None:
    """Why Torch-Pruning, removing a unit of carfast's (probed: the first and the last), would cut other
    channels of a Conv2d / Linear, or other rows of a depthwise conv, than carfast's deletion does; None
    where they cut the same. Both see the same producers in a selective kernel's group, but Torch-Pruning
    deletes its attention conv's rows 2c and 2c + 1 where the attention's view makes them c and C + c; a
    depthwise conv with a channel multiplier m loses rows cm .. cm + m - 1 in carfast, none in Torch-Pruning
    1.6.1 (which takes it for a grouped conv and cuts its input channel c alone)."""
    cuts = _carfast_cuts(flow)
    for unit in sorted({0, flow.num_units - 1}):
        channels = (flow.unit_of == unit).nonzero().flatten().tolist()
        theirs, ours = _torch_pruning_cuts(DG, root, channels), cuts(unit)
        for key in sorted(set(theirs) | set(ours), key=lambda k: (k[0], k[1] != "out")):   # rows first
            if theirs.get(key) != ours.get(key):
                name, side = key
                return (f"for channel {unit} of this group Torch-Pruning would delete {side}put channels "
                        f"{theirs.get(key, [])[:4]} of {name!r}, carfast {ours.get(key, [])[:4]}: Torch-Pruning's "
                        "deletion is not the one carfast scores")
    return None


def _plain(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or isinstance(m, nn.Conv2d) and m.groups == 1


def _carfast_cuts(flow):
    """unit -> {(layer, "out" / "in"): sorted channels} carfast's deletion cuts from plain Conv2d / Linear
    modules, and the rows ("out") it deletes from depthwise convs: a depthwise target's own, another's
    m per group (its multiplier m) (other grouped convs, channel maps and per-channel tensors are left to
    the producers' comparison)."""
    members = []
    for m in members_of(flow):
        module = flow.modules.get(m.layer, nn.Identity())
        if m.role in ("output", "input") and _plain(module) or m.role == "output" and _depthwise(module):
            members.append((m, "out" if m.role == "output" else "in", m.width))
        elif m.role == "depthwise" and _depthwise(module):
            members.append((m, "out", module.out_channels // module.groups))   # group c: rows c*m .. c*m + m - 1

    def cuts(unit: int) -> dict:
        out = {}
        for m, side, width in members:
            ch = m.channels[unit]
            idx = sorted(i for c in (ch if isinstance(ch, list) else [ch]) if c >= 0
                         for i in range(c * width, (c + 1) * width))
            if idx:
                out[(m.layer, side)] = idx
        return out
    return cuts


def _torch_pruning_cuts(DG, root: nn.Module, channels: list[int]) -> dict:
    """{(layer, "out" / "in"): sorted channels} Torch-Pruning cuts from plain Conv2d / Linear modules and
    depthwise convs when ``channels`` of ``root`` go (a depthwise conv's input pruning, in Torch-Pruning,
    deletes its rows: an out-channel pruning function)."""
    fn = tp.prune_conv_out_channels if isinstance(root, nn.Conv2d) else tp.prune_linear_out_channels
    out = {}
    for dep, idxs in DG.get_pruning_group(root, fn, idxs=channels):
        m = dep.target.module
        if (_plain(m) or _depthwise(m)) and layer_name(DG, m) is not None:
            key = (layer_name(DG, m), "out" if DG.is_out_channel_pruning_fn(dep.handler) else "in")
            out.setdefault(key, set()).update(int(i) for i in idxs)
    return {k: sorted(v) for k, v in out.items()}


class ChannelMapPruner(tp.pruner.BasePruningFunc):
    """Torch-Pruning pruner of a channel-map shortcut (``models.OptionAShortcut``): removing input or output
    channels edits its map, so its input and output channels belong to different groups."""

    def prune_out_channels(self, layer: nn.Module, idxs) -> nn.Module:
        remap_channel_map(layer, set(), {int(i) for i in idxs})
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs) -> nn.Module:
        remap_channel_map(layer, {int(i) for i in idxs}, set())
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.carfast_channel_map()[1]

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.carfast_channel_map()[0]


def channel_map_pruners(model: nn.Module) -> dict:
    """``customized_pruners`` for Torch-Pruning: a ``ChannelMapPruner`` for each channel-map shortcut class
    in ``model`` (``{OptionAShortcut: ChannelMapPruner()}`` for the CIFAR ResNets; empty when none)."""
    return {type(m): ChannelMapPruner() for m in model.modules() if is_channel_map(m)}
