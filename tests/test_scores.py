"""LayerScores: derived fields, ranking order, JSON export."""
import json

import pytest
import torch

from carfast.scoring.scores import LayerScores
from carfast.scoring.selection import DEFAULT_RULE, LCB_Z, flip_counts


def _scores():
    # 3 filters, 2 classes, 10 images (6 of class 0, 4 of class 1)
    return LayerScores(
        layer="conv", filters=torch.tensor([5, 2, 7]), num_images=10, class_totals=torch.tensor([6, 4]),
        base_correct=torch.tensor([5, 3]), correct=torch.tensor([[5, 3], [4, 3], [5, 3]]),
        base_loss_sum=2.0, loss_sum=torch.tensor([2.5, 3.0, 2.5], dtype=torch.float64))


def test_derived_fields():
    s = _scores()
    assert s.base_accuracy == 0.8
    assert torch.allclose(s.accuracy, torch.tensor([0.8, 0.7, 0.8], dtype=torch.float64))
    assert torch.allclose(s.car, torch.tensor([0.0, 0.1, 0.0], dtype=torch.float64))
    assert torch.allclose(s.class_car, torch.tensor([[0.0, 0.0], [1 / 6, 0.0], [0.0, 0.0]], dtype=torch.float64))
    assert torch.allclose(s.loss_increase, torch.tensor([0.05, 0.1, 0.05], dtype=torch.float64))


def test_ranking_accuracy_then_loss_then_index():
    s = _scores()
    # filters 5 and 7 tie on accuracy and loss: lowest index first; filter 2 costs accuracy: last
    assert s.ranking("accuracy").tolist() == [5, 7, 2]
    s.loss_sum = torch.tensor([2.6, 3.0, 2.5], dtype=torch.float64)
    assert s.ranking("accuracy").tolist() == [7, 5, 2]


def test_rules_order_differently():
    s = _scores()
    s.loss_sum = torch.tensor([2.9, 2.6, 2.5], dtype=torch.float64)     # filter 2 costs an image, little loss
    assert s.ranking("accuracy").tolist() == [7, 5, 2]
    assert s.ranking("loss").tolist() == [7, 2, 5]
    assert s.ranking().tolist() == s.ranking(DEFAULT_RULE).tolist()
    with pytest.raises(ValueError, match="per-image"):
        s.ranking("lcb")
    with pytest.raises(ValueError, match="rule must be one of"):
        s.ranking("best")
    # lcb: filter 5 turns 4 images wrong and 2 right, filter 2 turns one wrong, filter 7 none: 7, 2, 5 at z = 2
    base = torch.tensor([True] * 8 + [False] * 2)
    now5 = base.clone()
    now5[:4] = False
    now5[8:] = True
    now5[4:6] = True
    s.base_image_correct = base
    s.image_correct = torch.stack([now5, torch.cat([base[:7], torch.tensor([False]), base[8:]]), base.clone()])
    gained, lost = flip_counts(s)
    assert gained.tolist() == [2, 0, 0] and lost.tolist() == [4, 1, 0]
    assert LCB_Z == 2.0 and s.ranking("lcb").tolist() == [7, 2, 5]


def test_to_dict_is_json_and_table_lists_every_filter():
    s = _scores()
    d = json.loads(json.dumps(s.to_dict()))
    assert d["car"] == s.car.tolist() and d["ranking"] == [5, 7, 2] and d["correct"] == [[5, 3], [4, 3], [5, 3]]
    table = repr(s)
    assert "base accuracy 80.00 %" in table
    lines = table.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["rank", "filter"]) + 1
    rows = [line.split() for line in lines[start:]]
    assert [int(r[1]) for r in rows] == [5, 7, 2]
    # the header says the order and the units: ranked by loss increase (not CAR), .car a fraction
    assert "order: least important first, by loss + smallest first (not by CAR): rule 'loss'" in table
    assert "CAR % = 100 x .car, which is a fraction" in table and "(nats)" in table
    assert "by accuracy % highest first" in s.table(rule="accuracy")
