"""Class-wise CAR interpretation (carfast/scoring/classwise.py) on hand-made scores with known answers and on a
real ResNet-20 score."""
import json
import math

import pytest
import torch

import carfast
from carfast.scoring.classwise import ClassImportance
from carfast.scoring.scores import LayerScores


def _scores(correct, totals=(10, 10, 10, 10), base=(8, 8, 8, 8), filters=(5, 2, 7, 0)):
    correct = torch.tensor(correct, dtype=torch.int64)
    return LayerScores(layer="conv", filters=torch.tensor(filters), num_images=sum(totals),
                       class_totals=torch.tensor(totals), base_correct=torch.tensor(base), correct=correct,
                       base_loss_sum=1.0, loss_sum=torch.ones(correct.shape[0], dtype=torch.float64))


# class_car rows:  f5: [0, 0, 0, .5]  (only class 3)   f2: [.2, .2, .2, .2]  (all equally)
#                  f7: [-.1, 0, 0, 0] (hurts nothing)  f0: [.4, .2, 0, 0]
HAND = [[8, 8, 8, 3], [6, 6, 6, 6], [9, 8, 8, 8], [4, 6, 8, 8]]
NAMES = ["cat", "dog", "ship", "frog"]


def test_matrix_and_fields():
    ci = ClassImportance.from_scores(_scores(HAND), NAMES)
    expect = torch.tensor([[0, 0, 0, .5], [.2, .2, .2, .2], [-.1, 0, 0, 0], [.4, .2, 0, 0]], dtype=torch.float64)
    torch.testing.assert_close(ci.matrix, expect)
    assert ci.matrix.shape == (4, 4) and ci.matrix.dtype == torch.float64
    assert ci.filters.tolist() == [5, 2, 7, 0] and ci.class_names == NAMES and ci.layer == "conv"
    torch.testing.assert_close(ci.car, torch.tensor([.125, .2, -.025, .15], dtype=torch.float64))
    assert ClassImportance.from_scores(_scores(HAND)).class_names == ["0", "1", "2", "3"]


def test_per_filter():
    pf = ClassImportance.from_scores(_scores(HAND), NAMES).per_filter(top=2)
    assert list(pf) == [5, 2, 7, 0]               # keyed by filter, as per_class is keyed by class
    pf = list(pf.values())
    assert pf[0]["most"] == [("frog", 0.5), ("cat", 0.0)]            # ties to the lower class index
    assert pf[0]["least"] == [("cat", 0.0), ("dog", 0.0)]
    assert [n for n, _ in pf[3]["most"]] == ["cat", "dog"]
    assert pf[3]["most"][0][1] == pytest.approx(0.4)
    assert pf[2]["least"][0] == ("cat", pytest.approx(-0.1))
    assert len(ClassImportance.from_scores(_scores(HAND)).per_filter(top=10)[5]["most"]) == 4


def test_per_class():
    pc = ClassImportance.from_scores(_scores(HAND), NAMES).per_class(top=3)
    assert list(pc) == NAMES
    assert [f for f, _ in pc["cat"]] == [0, 2, 5]                     # .4, .2, 0 (f5 before f7's -.1)
    assert [f for f, _ in pc["frog"]] == [5, 2, 7]                    # .5, .2, then tie at 0: lower row
    assert pc["frog"][0][1] == pytest.approx(0.5)


def test_selectivity_known_values():
    sel = ClassImportance.from_scores(_scores(HAND), NAMES).selectivity()
    q = torch.tensor([2 / 3, 1 / 3], dtype=torch.float64)
    expect_f0 = 1 - float(-(q * q.log()).sum()) / math.log(4)
    assert sel.dtype == torch.float64 and sel.shape == (4,)
    torch.testing.assert_close(sel, torch.tensor([1.0, 0.0, 0.0, expect_f0], dtype=torch.float64))


def test_class_without_images():
    correct = [row + [0] for row in HAND]
    ci = ClassImportance.from_scores(_scores(correct, (10, 10, 10, 10, 0), (8, 8, 8, 8, 0)), NAMES + ["bird"])
    assert bool(torch.isnan(ci.matrix[:, 4]).all())
    assert ci.per_class()["bird"] == []
    assert all(name != "bird" for d in ci.per_filter(top=5).values() for name, _ in d["most"] + d["least"])
    plain = ClassImportance.from_scores(_scores(HAND), NAMES).selectivity()
    torch.testing.assert_close(ci.selectivity(), plain)               # C' = 4 classes with images
    d = json.loads(json.dumps(ci.to_dict(), allow_nan=False))
    assert d["matrix"][0][4] is None and d["per_class"]["bird"] == []


def test_to_dict_and_table():
    ci = ClassImportance.from_scores(_scores(HAND), NAMES)
    d = json.loads(json.dumps(ci.to_dict(top=1), allow_nan=False))
    assert d["filters"] == [5, 2, 7, 0] and d["class_names"] == NAMES
    assert d["per_filter"][0] == {"filter": 5, "most": [["frog", 0.5]], "least": [["cat", 0.0]]}
    assert d["per_class"]["cat"][0] == [0, pytest.approx(0.4)]
    assert d["selectivity"][:3] == [1.0, 0.0, 0.0]
    lines = ci.table(top=1).splitlines()
    assert "'conv'" in lines[0] and len(lines) == 2 + 4
    assert lines[2].split()[0] == "2" and lines[-1].split()[0] == "7"   # largest CAR first, smallest last
    row5 = next(line for line in lines if line.split()[0] == "5")
    assert row5.endswith("frog +50.0  |  -")                       # f5 helps no class: nothing gains
    row7 = next(line for line in lines if line.split()[0] == "7")
    assert row7.endswith("-  |  cat -10.0")
    assert repr(ci) == ci.table()


def test_bad_input():
    s = _scores(HAND)
    with pytest.raises(ValueError, match="3 class names for 4 classes"):
        ClassImportance.from_scores(s, NAMES[:3])
    with pytest.raises(ValueError, match="class names repeat"):
        ClassImportance.from_scores(s, ["a", "a", "b", "c"])
    with pytest.raises(TypeError, match="expected LayerScores"):
        ClassImportance.from_scores(s.to_dict())
    with pytest.raises(ValueError, match=r"per_class: top must be a positive int"):
        ClassImportance.from_scores(s).per_class(top=0)


def test_real_resnet_layer():
    model = carfast.models.cifar_resnet(20)
    scores = carfast.score_layer(model, "layer1.0.conv1", carfast.data.cifar10_test(500), progress=False)
    names = carfast.data.cifar10_classes()
    ci = ClassImportance.from_scores(scores, names)
    cc = scores.class_car
    assert torch.equal(ci.matrix, cc) and ci.matrix.shape == (16, 10)
    filt = scores.filters.tolist()
    for c, name in enumerate(names):
        got = ci.per_class(top=5)[name]
        order = sorted(range(16), key=lambda i: (-float(cc[i, c]), i))[:5]
        assert got == [(filt[i], float(cc[i, c])) for i in order]
        assert got[0][1] == float(cc[:, c].max())
    for i, d in enumerate(ci.per_filter(top=3).values()):
        assert [v for _, v in d["most"]] == sorted(cc[i].tolist(), reverse=True)[:3]
        assert [v for _, v in d["least"]] == sorted(cc[i].tolist())[:3]
        assert d["most"][0][0] == names[int(torch.argmax(cc[i]))] or d["most"][0][1] == d["most"][1][1]
    sel = ci.selectivity()
    assert sel.shape == (16,) and float(sel.min()) >= 0 and float(sel.max()) <= 1
    hurts = cc.clamp(min=0).sum(1) > 0
    assert bool((sel[~hurts] == 0).all()) and bool((sel[hurts] < 1).any())
    json.dumps(ci.to_dict(), allow_nan=False)
    assert len(ci.table().splitlines()) == 2 + 16
