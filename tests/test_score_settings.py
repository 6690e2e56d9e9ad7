"""The score options are declared once (``carfast.scoring.settings.ScoreSettings``) and every entry point that
scores takes exactly those, by the same names and defaults: the Python functions and scorers, ``prune``,
``CARImportance`` and the command line."""
from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from nets.basic import own_labels, randomize
from torch import nn

import carfast
from carfast.cli.app import _parser as build_parser
from carfast.cli.common import score_options
from carfast.errors import CliError
from carfast.pruning.config import SCORE_KEYS
from carfast.scoring.settings import SCORE_OPTIONS, ScoreSettings

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ScoreSettings)}


@pytest.mark.parametrize("entry", [carfast.score_layer, carfast.score_group, carfast.LayerScorer,
                                   carfast.GroupScorer])
def test_entry_points_list_every_option_with_its_declared_default_and_doc(entry):
    params = inspect.signature(entry).parameters
    declared = {name: params[name].default for name in SCORE_OPTIONS if name in params}
    assert declared == _DEFAULTS
    assert all(params[name].kind is inspect.Parameter.KEYWORD_ONLY for name in SCORE_OPTIONS)
    if not isinstance(entry, type):
        doc = entry.__doc__
        assert "{score_options}" not in doc
        assert all(f"        {name}: " in doc for name in SCORE_OPTIONS), doc


def _tiny():
    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3, padding=1),
                                    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3)), seed=0)
    return model, own_labels(model, (3, 6, 6), 24, seed=0, num_classes=3)


def test_an_unknown_option_is_refused_by_name_everywhere():
    model, data = _tiny()
    for call in (lambda: carfast.score_layer(model, "0", data, batchsize=8),
                 lambda: carfast.LayerScorer(model, "0", data, batchsize=8),
                 lambda: carfast.prune(model, ["0"], data, keep=2, batchsize=8)):
        with pytest.raises(TypeError, match=r"unexpected argument\(s\) \['batchsize'\]"):
            call()


def test_options_given_by_name_reach_the_scorer():
    model, data = _tiny()
    scorer = carfast.LayerScorer(model, "0", data, backend="torch", batch_size=7, topk=2, progress=False)
    assert (scorer.backend, scorer.topk) == ("torch", 2)
    a = carfast.score_layer(model, "0", data, progress=False)
    b = carfast.score_layer(model, "0", data, progress=False, backend="torch", batch_size=3)
    assert torch.equal(a.correct, b.correct)


def test_prune_and_car_importance_take_the_declared_options():
    assert set(SCORE_KEYS) == set(SCORE_OPTIONS) - {"progress"}
    tp = pytest.importorskip("carfast.integrations.torch_pruning")
    assert tp._OPTIONS == set(SCORE_OPTIONS) - {"group"}
    with pytest.raises(TypeError, match="batchsize"):
        tp.CARImportance(_tiny()[1], batchsize=8)


def test_command_line_offers_the_options_with_a_cli_entry():
    with_cli = {f.name for f in dataclasses.fields(ScoreSettings) if f.metadata["cli"] is not None}
    assert {"device", "backend", "precision", "topk", "memory_budget"} <= with_cli
    args = build_parser().parse_args(["score", "--backend", "torch", "--topk", "5", "--memory-budget", "1e9"])
    assert score_options(args) == {**{k: _DEFAULTS[k] for k in with_cli}, "backend": "torch", "topk": 5,
                                   "memory_budget": 1e9}
    with pytest.raises((SystemExit, CliError)):
        build_parser().parse_args(["score", "--topk", "0"])
