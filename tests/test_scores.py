"""LayerScores: derived fields, ranking order, JSON export."""
import json

import torch

from carfast.scoring.scores import LayerScores


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
    assert s.ranking().tolist() == [5, 7, 2]
    s.loss_sum = torch.tensor([2.6, 3.0, 2.5], dtype=torch.float64)
    assert s.ranking().tolist() == [7, 5, 2]


def test_to_dict_is_json_and_table_lists_every_filter():
    s = _scores()
    d = json.loads(json.dumps(s.to_dict()))
    assert d["car"] == s.car.tolist() and d["ranking"] == [5, 7, 2] and d["correct"] == [[5, 3], [4, 3], [5, 3]]
    table = repr(s)
    assert "base accuracy 80.00 %" in table
    rows = [line.split() for line in table.splitlines()[2:]]
    assert [int(r[1]) for r in rows] == [5, 7, 2]
