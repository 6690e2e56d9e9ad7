"""Several criteria pruning the same layers to the same sizes (``carfast.compare_criteria``), the record
saved with a ``PruneResult``, ``carfast prune --compare`` and the report's comparison section."""
import json
import os
import re

import numpy as np
import pytest
import torch

import carfast
from carfast.cli import main
from carfast.data import cifar10_test
from carfast.models import cifar_resnet
from carfast.pruning.compare import CriteriaComparison
from carfast.surgery.pruned_io import read_saved, save_pruned

pytestmark = pytest.mark.usefixtures("one_thread")

LAYER = "layer3.2.conv1"          # closed-form scoring: fast


@pytest.fixture(scope="module")
def run():
    torch.set_num_threads(1)
    model = cifar_resnet(20)
    x, y = cifar10_test(80)
    data, held = (x[:40], y[:40]), (x[40:], y[40:])
    comp = carfast.compare_criteria(model, [LAYER], data, held, 60, ["car", "l1", "random"], progress=False)
    return model, data, held, comp


def test_rows_equal_evaluating_each_pruned_model(run):
    model, data, held, comp = run
    assert [r["criterion"] for r in comp.rows] == ["car", "l1", "random"]
    assert comp.held_out_images == 40 and comp.selection_images == 40 and comp.filters == {LAYER: (64, 60)}
    assert comp.unpruned_held_out_accuracy == carfast.evaluate(model, held).accuracy
    assert comp.unpruned_selection_accuracy == carfast.evaluate(model, data).accuracy
    for r in comp.rows:
        res = comp.results[r["criterion"]]
        assert r["held_out_accuracy"] == carfast.evaluate(res.model, held).accuracy
        assert r["selection_accuracy"] == carfast.evaluate(res.model, data).accuracy
        assert r["removed"] == res.removed and len(res.kept[LAYER]) == 60
        assert res.model.get_submodule(LAYER).out_channels == 60
    # each criterion did its own thing: CAR is greedy CAR, L1 removes the smallest-norm filters
    assert comp.results["car"].removed == carfast.prune(model, LAYER, data, keep=60, progress=False).removed
    norms = model.get_submodule(LAYER).weight.detach().abs().sum((1, 2, 3))
    assert sorted(comp.row("l1")["removed"][LAYER]) == sorted(norms.argsort()[:4].tolist())
    assert model.get_submodule(LAYER).out_channels == 64                   # the input model is not changed


def test_random_is_seeded_so_reruns_agree(run):
    model, data, held, comp = run
    again = carfast.compare_criteria(model, [LAYER], data, held, 60, "random", progress=False)
    assert again.rows[0]["removed"] == comp.row("random")["removed"]
    assert again.rows[0]["held_out_accuracy"] == comp.row("random")["held_out_accuracy"]


def test_record_round_trip_and_table(run):
    *_, comp = run
    record = comp.to_dict()
    json.dumps(record)                                                      # plain data
    back = CriteriaComparison.from_dict(record)
    assert back.to_dict() == record and back.results == {}
    text = comp.table()
    assert "held-out top-1 %" in text and "selection top-1 %" in text
    car = comp.row("car")
    change = 100 * (car["held_out_accuracy"] - comp.unpruned_held_out_accuracy)
    assert re.search(rf"CAR\s+{100 * car['held_out_accuracy']:.2f}\s+{re.escape(f'{change:+.2f}')} pts\s+"
                     rf"{100 * car['selection_accuracy']:.2f}", text)
    with pytest.raises(ValueError, match="from_dict: expected a dict with held_out_images"):
        CriteriaComparison.from_dict({"rows": []})


def test_comparison_survives_save_and_load(run, tmp_path):
    *_, comp = run
    res = comp.results["car"]
    res.comparison = comp.to_dict()
    try:
        res.save(tmp_path / "r.pt")
    finally:
        res.comparison = None
    loaded = carfast.load_pruned(tmp_path / "r.pt")
    assert loaded.comparison == comp.to_dict()
    # a file written before the record existed (no "comparison" key) still loads, without one
    saved = read_saved(tmp_path / "r.pt")
    extra = {k: v for k, v in saved["extra"].items() if k != "comparison"}
    save_pruned(loaded.model, tmp_path / "old.pt", extra=extra)
    old = carfast.load_pruned(tmp_path / "old.pt")
    assert old.comparison is None and old.removed == res.removed


def test_bad_arguments_are_named(run):
    model, data, held, _ = run
    with pytest.raises(ValueError, match="unknown criterion 'nope'; valid names: car, random, l1"):
        carfast.compare_criteria(model, [LAYER], data, held, 60, ["car", "nope"])
    with pytest.raises(ValueError, match="held_out is None"):
        carfast.compare_criteria(model, [LAYER], data, None, 60)
    with pytest.raises(ValueError, match="each once"):
        carfast.compare_criteria(model, [LAYER], data, held, 60, ["l1", "l1"])
    with pytest.raises(TypeError, match="criterion= is set by compare_criteria"):
        carfast.compare_criteria(model, [LAYER], data, held, 60, criterion="l1")


def test_baselines_take_the_sizes_the_first_reached(run):
    """A budget stops CAR early; the baselines are pruned to where it stopped, not to keep."""
    model, data, held, _ = run
    comp = carfast.compare_criteria(model, [LAYER], data, held, 1, ["car", "l1"], max_accuracy_drop=0.0,
                                    progress=False)
    car, l1 = comp.results["car"], comp.results["l1"]
    assert LAYER in car.stops and len(l1.kept[LAYER]) == len(car.kept[LAYER]) > 1 and not l1.stops


# ---- the command ------------------------------------------------------------------------------------------
def _one_line_error(capsys, command="prune"):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith("note:")]
    assert len(lines) == 1 and lines[0].startswith(f"carfast {command}: error: "), err
    return lines[0]


@pytest.mark.parametrize("argv, expected", [
    (["--compare", "l1,bogus"], "unknown criterion 'bogus'; give comma-separated names from car, random, l1"),
    (["--compare", "l1,l1"], "named twice"),
    (["--compare", "car"], "car is already --criterion"),
    (["--compare", "l1", "--n", "2000"], "--compare needs held-out images, but the run scores on all 2,000 images"),
    (["--held-out", "MISSING", "--compare", "l1"], "--held-out MISSING: no such file"),
    (["--held-out", "MISSING"], "--held-out serves --compare"),
])
def test_compare_errors_are_one_line(argv, expected, tmp_path, capsys):
    argv = [str(tmp_path / "nope.npz") if a == "MISSING" else a for a in argv]
    expected = expected.replace("MISSING", str(tmp_path / "nope.npz"))
    try:
        code = main(["prune", "--model", "resnet20", "--layer", LAYER, "--keep", "60", "--n", "20",
                     "--out", str(tmp_path / "r.pt"), *argv])
    except SystemExit as exit_:                                   # argparse's own checks
        code = exit_.code
    assert code == 2
    assert expected in _one_line_error(capsys)
    assert not (tmp_path / "r.pt").exists()


def test_prune_compare_with_a_held_out_file_then_report(tmp_path, capsys):
    x8 = (np.random.default_rng(0).random((30, 32, 32, 3)) * 255).astype(np.uint8)
    held = tmp_path / "held.npz"
    np.savez(held, x=x8, y=np.arange(30) % 10)
    out = tmp_path / "r.pt"
    assert main(["prune", "--model", "resnet20", "--layer", LAYER, "--keep", "0.9375", "--n", "30",
                 "--compare", "l1,random", "--held-out", str(held), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "held out: 30 images not used for choosing filters" in text
    assert re.search(rf"{re.escape(LAYER)} filters\s+64 -> 60\s+\(kept 93.8 %, removed 4\)", text)
    result = carfast.load_pruned(out)
    comp = result.comparison
    assert [r["criterion"] for r in comp["rows"]] == ["car", "l1", "random"]
    assert comp["rows"][0]["removed"] == result.removed and comp["held_out_images"] == 30
    xh, yh, _ = carfast.data.load_npz(held, normalization=carfast.models.CIFAR_RESNET_NORMALIZATION)
    assert comp["rows"][0]["held_out_accuracy"] == carfast.evaluate(result.model, (xh, yh)).accuracy
    assert result.settings["cli_model"]["held_out"] == str(held)

    assert main(["report", str(out), "--out", str(tmp_path / "rep")]) == 0
    page = (tmp_path / "rep" / "index.html").read_text(encoding="utf-8")
    page = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "IMG", page)
    assert "<h2>Criteria compared on held-out images</h2>" in page and "criteria.png" in page
    assert f"<h3>Removal order: {LAYER} (64 -&gt; 60 filters)</h3>" in page
    assert "<th>CAR</th><th>L1 norm</th><th>random (seed 0)</th>" in page
    assert os.path.exists(tmp_path / "rep" / "criteria.png")
    d = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert d["comparison"]["rows"] == comp["rows"]
    assert d["heldout"]["num_images"] == 30                 # the report holds out the same file


def test_prune_compare_holds_out_the_images_after_n(tmp_path, capsys):
    out = tmp_path / "r.pt"
    assert main(["prune", "--model", "resnet20", "--layer", LAYER, "--keep", "62", "--n", "1990",
                 "--compare", "l1", "--out", str(out)]) == 0
    assert "held out: 10 images not used" in capsys.readouterr().out
    result = carfast.load_pruned(out)
    x, y = cifar10_test()
    assert result.comparison["held_out_images"] == 10
    assert result.comparison["rows"][0]["held_out_accuracy"] == carfast.evaluate(result.model, (x[1990:],
                                                                                                y[1990:])).accuracy
