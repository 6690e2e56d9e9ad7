"""``PruneConfig``: the arguments of ``carfast.prune``, checked once, and what each name to prune means.

A name in ``layers`` is a Conv2d / Linear. If its channels are coupled with other layers' (a residual
stream; see ``carfast.graph.find_group``), or it is given as ``carfast.Group(layer)``, it means its
coupling group: the group's channels are pruned together, scored and cut as a ``Group`` target.
``Target`` records which, with the number of channels (filters, or the group's channels) and how many to
keep.
"""
from __future__ import annotations

import collections.abc
from dataclasses import dataclass, field

import torch
from torch import nn

from carfast.batching import as_batches, check_batch, eval_mode, model_device
from carfast.criteria import get_criterion
from carfast.graph import analyze, analyze_units, build_graph
from carfast.graph.target import Group, resolve_target, target_spec
from carfast.scoring.race import Race, check_race_rule, check_search
from carfast.scoring.selection import DEFAULT_RULE, check_rule, check_rule_precision
from carfast.scoring.settings import SCORE_OPTIONS

__all__ = ["Target", "PruneConfig", "SCORE_KEYS"]

_FN = "prune"
#: the score options ``prune`` passes on (``ScoreSettings``; its own ``progress`` is not one of them)
SCORE_KEYS = tuple(k for k in SCORE_OPTIONS if k != "progress")


@dataclass
class Target:
    """One name to prune: a layer, or (``group``) the coupling group of that layer."""
    name: str
    group: bool
    units: int                 # filters of the layer, or channels of the group
    keep: int = 0
    max_drop: float | None = None

    @property
    def unit_word(self) -> str:
        return "channels" if self.group else "filters"

    @property
    def spec(self):
        """The target as scoring and surgery take it: the layer's name, or ``Group(name)``."""
        return target_spec(self.name, self.group)


@dataclass
class PruneConfig:
    """The checked arguments of ``carfast.prune`` (see its docstring)."""
    targets: list[Target]
    step: int = 1
    schedule: str = "sequential"
    criterion: object = None             # None: CAR; else a callable (model, layer, data) -> [F]
    criterion_name: str = "car"
    rule: str = DEFAULT_RULE             # CAR's selection rule (scoring.selection)
    search: Race | None = None           # None: the exact search; else the raced one's settings (scoring.race)
    finetune: object = None
    checkpoint: str | None = None
    score_options: dict = field(default_factory=dict)
    example: torch.Tensor | None = None  # one input [1, ...]

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.targets]

    def target(self, name: str) -> Target:
        return next(t for t in self.targets if t.name == name)

    @classmethod
    def build(cls, model: nn.Module, layers, data, *, keep, step, schedule, criterion, rule, max_accuracy_drop,
              finetune, checkpoint, score_options, search="exact") -> "PruneConfig":
        """Check every argument (ValueError / TypeError naming the problem and the fix) before any work."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"{_FN}: model must be a torch.nn.Module, got {type(model).__name__}")
        unknown = sorted(set(score_options) - set(SCORE_KEYS))
        if unknown:
            raise TypeError(f"{_FN}: unexpected argument(s) {unknown}; score options are {list(SCORE_KEYS)}")
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise ValueError(f"{_FN}: step must be a positive int, got {step!r}")
        if schedule not in ("sequential", "global"):
            raise ValueError(f"{_FN}: schedule must be 'sequential' or 'global', got {schedule!r}")
        crit = None if criterion in ("car", None) else get_criterion(criterion)
        if crit is not None and rule is not None:
            raise ValueError(f"{_FN}: rule={rule!r} is CAR's selection rule; criterion={criterion!r} ranks by its own "
                             "importance: drop rule, or use criterion='car'")
        rule = DEFAULT_RULE if rule is None else check_rule(rule, _FN)
        if crit is None:
            check_rule_precision(rule, score_options.get("precision"), _FN)
        search = check_search(search, _FN)
        if search is not None and crit is not None:
            raise ValueError(f"{_FN}: search={search!r} is how CAR searches for its choice; criterion={criterion!r} "
                             "ranks by its own importance: drop search, or use criterion='car'")
        check_race_rule(search, rule, _FN)
        _check_finetune(finetune)
        example = _example(data)
        names, groups = _layer_names(model, layers)
        targets = _targets(model, names, groups, example)
        _set_keep(targets, keep)
        _set_drops(targets, max_accuracy_drop)
        return cls(targets, step, schedule, crit, "car" if crit is None else getattr(crit, "__name__", str(criterion)),
                   rule, search, finetune, checkpoint, dict(score_options), example)


def _check_finetune(finetune) -> None:
    if finetune is None or callable(finetune):
        return
    if not isinstance(finetune, dict):
        raise TypeError(f"{_FN}: finetune must be None, a callable(model) -> model, or a dict config with "
                        f"'data', got {type(finetune).__name__}")
    if "data" not in finetune:
        raise ValueError(f"{_FN}: finetune config needs 'data': the training (inputs, labels) or batches, "
                         "e.g. carfast.data.cifar10_train(path)")


def _example(data) -> torch.Tensor:
    if isinstance(data, collections.abc.Iterator):
        raise ValueError(f"{_FN}: data is a one-shot iterator, but pruning reads it many times; pass "
                         "(inputs, labels), a list of batches or a DataLoader")
    first = next(iter(as_batches(data, _FN)), None)
    if first is None:
        raise ValueError(f"{_FN}: data holds no images; pass at least one (inputs, labels) pair")
    return check_batch(first, _FN)[0][:1]


def _layer_names(model: nn.Module, layers) -> tuple[list[str], set[str]]:
    """The names of ``layers``, and those given as a ``Group``."""
    if isinstance(layers, (str, nn.Module, Group)):
        layers = [layers]
    if not isinstance(layers, collections.abc.Iterable):
        raise TypeError(f"{_FN}: layers must be a layer name, a module, a carfast.Group, or a list of them, got "
                        f"{type(layers).__name__}")
    resolved = [resolve_target(model, layer, _FN) for layer in layers]
    names = [name for name, _, _ in resolved]
    if not names:
        raise ValueError(f"{_FN}: layers is empty; name at least one layer to prune")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{_FN}: layers lists {dup} more than once; list each layer once")
    return names, {name for name, _, group in resolved if group}


def _targets(model: nn.Module, names: list[str], groups: set[str], example: torch.Tensor) -> list[Target]:
    """Each name as a layer, or as its coupling group when its channels are coupled or it is in ``groups``;
    refusals named now."""
    targets, owner = [], {}
    example = example.to(model_device(model))
    with eval_mode(model), torch.no_grad():
        graph = build_graph(model, example)
        for name in names:
            if name in groups:
                flow, group = analyze(model, name, example, _FN, group=True, graph=graph), True
            else:
                flow, group = analyze_units(model, name, example, _FN, graph=graph)
            for p in flow.producers if group else ():
                if p.op.name in owner:
                    raise ValueError(f"{_FN}: {owner[p.op.name]!r} and {name!r} are in one coupling group; list the "
                                     "group once, by one of its layers")
                owner[p.op.name] = name
            targets.append(Target(name, group, flow.num_units))
    return targets


def _keep_one(value, t: Target) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{_FN}: keep for {t.name!r} must be an int ({t.unit_word} to keep) or a float fraction in "
                        f"(0, 1], got {value!r}")
    if isinstance(value, float):
        if not 0.0 < value <= 1.0:
            raise ValueError(f"{_FN}: keep={value} for {t.name!r} is not a fraction in (0, 1]; pass an int to keep "
                             f"that many {t.unit_word} (keep is the share KEPT, not removed)")
        return max(1, round(value * t.units))
    if not 1 <= value <= t.units:
        raise ValueError(f"{_FN}: keep={value} for {t.name!r} is impossible: it has {t.units} {t.unit_word}; keep "
                         f"between 1 and {t.units}")
    return value


def _per_target(value, targets: list[Target], what: str) -> dict:
    """{name: value} from one value for all, or from a dict naming exactly the targets."""
    if not isinstance(value, dict):
        return {t.name: value for t in targets}
    names = [t.name for t in targets]
    missing = [n for n in names if n not in value]
    extra = [k for k in value if k not in names]
    if missing or extra:
        raise ValueError(f"{_FN}: {what} must give a value for exactly the listed layers; missing {missing}, "
                         f"not listed {extra}")
    return value


def _set_keep(targets: list[Target], keep) -> None:
    for t in targets:
        t.keep = _keep_one(_per_target(keep, targets, "keep")[t.name], t)


def _set_drops(targets: list[Target], max_accuracy_drop) -> None:
    if max_accuracy_drop is None:
        return
    for t in targets:
        d = _per_target(max_accuracy_drop, targets, "max_accuracy_drop")[t.name]
        if d is not None and (isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d <= 1):
            raise ValueError(f"{_FN}: max_accuracy_drop must be a fraction in [0, 1] (0.02 = two points), or a dict "
                             f"{{layer: fraction}}, got {d!r} for {t.name!r}")
        t.max_drop = d
