"""The pruning report (report.py), its figures (figures.py) and the filter pictures (filter_images.py)."""
import base64
import copy
import dataclasses
import json
import os
import re

import pytest
import torch
from nets import make_alexnet_head, make_data

import carfast
from carfast.data import cifar10_classes, cifar10_test
from carfast.models import cifar_resnet
from carfast.report import figures
from carfast.report.filter_images import colour_selectivity, filter_tiles
from carfast.report.page import history_curves, layer_importance, write_report
from carfast.scoring.classwise import ClassImportance

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread: these tests run tiny batches (and time single images), where a second thread only
    adds barrier waits, and those explode when other processes load the 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- filter_images ---------------------------------------------------------------------------------------
def _filter(r, g, b, size=3):
    """One filter [3, size, size] whose channels are the given patterns (scalars or [size, size])."""
    return torch.stack([torch.as_tensor(c, dtype=torch.float64).expand(size, size) for c in (r, g, b)])


def test_colour_selectivity_of_hand_made_filters():
    edge = torch.tensor([[1.0, 0.0, -1.0]] * 3)
    w = torch.stack([
        _filter(edge, edge, edge),                  # grey edge: luminance only
        _filter(edge, -edge, 0.0),                  # red minus green: pure colour opponent
        _filter(1.0, 0.0, 0.0),                     # red only: 2/3 of its energy is chromatic
        _filter(0.0, 0.0, 0.0),                     # dead filter
        _filter(2 * edge, edge, edge),              # mostly grey, a little red
    ])
    cs = colour_selectivity(w)
    assert cs.dtype == torch.float64 and cs.shape == (5,)
    assert cs[0].item() == pytest.approx(0.0, abs=1e-12)
    assert cs[1].item() == pytest.approx(1.0, abs=1e-12)
    assert cs[2].item() == pytest.approx(2 / 3, abs=1e-12)
    assert cs[3].item() == 0.0
    # (2,1,1): |w|^2 = 6, (w.u)^2 = 16/3, chromatic 2/3 -> 1/9
    assert cs[4].item() == pytest.approx(1 / 9, abs=1e-12)


def test_colour_selectivity_in_raw_rgb_terms():
    std = (0.2, 0.25, 0.4)
    grey_in_raw_rgb = _filter(std[0], std[1], std[2])      # w / std = (1, 1, 1)
    assert colour_selectivity(grey_in_raw_rgb[None]).item() > 0.01
    assert colour_selectivity(grey_in_raw_rgb[None], input_std=std).item() == pytest.approx(0.0, abs=1e-12)


def test_filter_tiles_scale_each_filter_symmetrically():
    w = torch.stack([_filter(torch.tensor([[2.0, 0.0], [-1.0, 0.0]]), 0.0, 0.0, size=2),
                     _filter(0.0, 0.0, 0.0, size=2),
                     100 * _filter(0.0, torch.tensor([[1.0, -1.0], [0.5, 0.0]]), 0.0, size=2)]).float()
    t = filter_tiles(w)
    assert t.shape == (3, 2, 2, 3) and t.dtype == torch.float64
    assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0
    assert t[0, 0, 0].tolist() == [1.0, 0.5, 0.5]              # the strongest weight saturates
    assert t[0, 1, 0, 0].item() == pytest.approx(0.25)          # -1 of max 2 -> 0.5 - 0.25
    assert bool((t[1] == 0.5).all())                            # dead filter: uniform grey
    assert t[2, 0, 1, 1].item() == 0.0 and t[2, 1, 0, 1].item() == 0.75   # scale independent of magnitude


@pytest.mark.parametrize("bad", [torch.zeros(4, 1, 3, 3), torch.zeros(3, 3, 3), [[0.0]]])
def test_filter_helpers_refuse_non_rgb_weights(bad):
    with pytest.raises((ValueError, TypeError), match="colour_selectivity: weight"):
        colour_selectivity(bad)
    with pytest.raises((ValueError, TypeError), match="filter_tiles: weight"):
        filter_tiles(bad)


# ---- shared pruning runs ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def resnet_run():
    model = cifar_resnet(20)
    x, y = cifar10_test(80)
    result = carfast.prune(model, "layer1.0.conv1", (x[:40], y[:40]), keep=14, progress=False)
    return model, result, (x[40:], y[40:])


@pytest.fixture(scope="module")
def rgb_run():
    case = make_alexnet_head()
    x, y = make_data(case, 60)
    result = carfast.prune(case.model, "features.0", (x, y), keep=5, progress=False)
    return case.model, result


def _strip_images(page: str) -> str:
    return re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "IMG", page)


def _embedded_pngs(page: str) -> list:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


# ---- write_report -------------------------------------------------------------------------------------------
def test_report_on_resnet_run(resnet_run, tmp_path):
    model, result, heldout = resnet_run
    state = copy.deepcopy(model.state_dict())
    curves = {"car": [(16, 0.9), (15, 0.9), (14, 0.88)], "l1": [(16, 0.9), (15, 0.8), (14, 0.7)]}
    index = write_report(result, tmp_path / "rep", original=model, heldout=heldout, curves=curves,
                         class_names=cifar10_classes(), title="ResNet <20> & friends")
    assert index == os.path.join(tmp_path, "rep", "index.html")
    page = open(index, encoding="utf-8").read()
    text = _strip_images(page)
    for section in ("<h2>Run settings</h2>", "<h2>Summary</h2>", "<h2>Accuracy while pruning</h2>",
                    "<h2>Class-wise CAR: layer1.0.conv1</h2>", "<h3>Per-filter interpretation</h3>",
                    "<h2>Removal history</h2>"):
        assert section in text
    assert "<h1>ResNet &lt;20&gt; &amp; friends</h1>" in text            # escaped
    assert "First-layer filters" not in text                            # no layer reads RGB here
    # self-contained: no external resources, every figure embedded and also on disk
    assert "<script" not in text and "<link" not in text and 'src="http' not in text
    pngs = _embedded_pngs(page)
    files = sorted(f for f in os.listdir(tmp_path / "rep") if f.endswith(".png"))
    assert files == sorted(["summary.png", "accuracy.png", "accuracy_compare.png", "classwise_layer1.0.conv1.png"])
    assert len(pngs) == len(files) and all(p.startswith(PNG_MAGIC) for p in pngs)
    assert sorted(pngs) == sorted(open(tmp_path / "rep" / f, "rb").read() for f in files)
    assert not [f for f in os.listdir(tmp_path / "rep") if f.startswith(".carfast-")]   # no temp files left
    # the numbers
    d = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert d["heldout"]["num_images"] == 40
    assert d["heldout"]["accuracy_after"] == carfast.evaluate(result.model, heldout).accuracy
    assert d["heldout"]["accuracy_before"] == carfast.evaluate(model, heldout).accuracy
    assert d["latency_s"]["before"] > 0 and d["latency_s"]["after"] > 0
    assert d["summary"]["params_after"] == result.stats["after"]["params"] < result.stats["before"]["params"]
    cw = d["layers"]["layer1.0.conv1"]["classwise"]
    assert cw["class_names"] == cifar10_classes()
    assert cw["car"] == pytest.approx(result.scores["layer1.0.conv1"].car.tolist())
    assert d["layers"]["layer1.0.conv1"]["removed"] == result.removed["layer1.0.conv1"]
    assert d["curves"]["given"]["l1"] == [[16, 0.9], [15, 0.8], [14, 0.7]]
    # the per-filter table has one row per filter, removed ones marked with their order
    assert text.count('<tr class="removed">') == 2
    first = result.removed["layer1.0.conv1"][0]
    assert f'<tr class="removed"><td class="num">{first}</td><td>removed #1</td>' in text
    # held-out accuracy appears in the summary table
    assert f"{100 * d['heldout']['accuracy_after']:.2f} %" in text
    # the original model is not changed
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items()) and not model.training


def test_report_without_original_or_heldout_says_what_is_missing(resnet_run, tmp_path):
    _, result, _ = resnet_run
    text = _strip_images(open(write_report(result, tmp_path), encoding="utf-8").read())
    assert "No held-out data was given" in text and "Latency needs the original model" in text
    d = json.loads((tmp_path / "summary.json").read_text())
    assert d["heldout"] is None and d["latency_s"] is None
    assert d["layers"]["layer1.0.conv1"]["classwise"]["class_names"] == [str(c) for c in range(10)]


def test_report_rgb_layer_pictures_removed_and_kept_filters(rgb_run, tmp_path):
    model, result = rgb_run
    index = write_report(result, tmp_path, original=model)
    text = _strip_images(open(index, encoding="utf-8").read())
    assert "<h2>First-layer filters: features.0</h2>" in text
    assert "Colour selectivity of removed vs kept filters" in text
    for f in ("filters_features.0.png", "filter_classes_features.0.png", "colour_features.0.png"):
        assert open(tmp_path / f, "rb").read(8) == PNG_MAGIC
    d = json.loads((tmp_path / "summary.json").read_text())["layers"]["features.0"]["filters"]
    removed, kept = result.removed["features.0"], result.kept["features.0"]
    w = model.get_submodule("features.0").weight
    assert list(d["colour_selectivity"]["removed"]) == [str(f) for f in removed]      # removal order
    assert list(d["colour_selectivity"]["removed"].values()) == pytest.approx(colour_selectivity(w[removed]).tolist())
    assert list(d["colour_selectivity"]["kept"].values()) == pytest.approx(colour_selectivity(w[kept]).tolist())
    assert d["weights"] == "original"


def test_report_rgb_layer_without_original_shows_kept_only(rgb_run, tmp_path):
    _, result = rgb_run
    text = _strip_images(open(write_report(result, tmp_path), encoding="utf-8").read())
    assert "removed filters&#x27; weights are not in the pruned model" in text
    assert not os.path.exists(tmp_path / "colour_features.0.png")      # needs the removed filters
    d = json.loads((tmp_path / "summary.json").read_text())["layers"]["features.0"]["filters"]
    assert d["colour_selectivity"]["removed"] is None and d["weights"] == "pruned model"
    pruned_w = result.model.get_submodule("features.0").weight
    assert list(d["colour_selectivity"]["kept"].values()) == pytest.approx(colour_selectivity(pruned_w).tolist())


def test_history_curves_start_at_full_size_with_the_accuracy_before():
    history = [{"layer": "a", "remaining": 3, "accuracy": 0.8}, {"layer": "a", "remaining": 2, "accuracy": 0.7},
               {"layer": "b", "remaining": 4, "accuracy": 0.6}]
    r = carfast.PruneResult(torch.nn.Identity(), {"a": [0, 3], "b": [1], "c": []}, {"a": [1, 2], "b": [0, 2, 3, 4],
                            "c": [0]}, history, {"accuracy": 0.9, "loss": 1.0, "num_images": 10}, {})
    assert history_curves(r) == {"a": [(4, 0.9), (3, 0.8), (2, 0.7)], "b": [(5, 0.7), (4, 0.6)]}


def test_late_scores_of_a_resumed_run_say_so(rgb_run):
    _, result = rgb_run
    s = result.scores["features.0"]
    early = result.removed["features.0"][0]
    # a sequential run resumed after one replayed removal scores the filters then left, by original index
    keep = [i for i, f in enumerate(s.filters.tolist()) if f != early]
    late = dataclasses.replace(s, filters=s.filters[keep], correct=s.correct[keep], loss_sum=s.loss_sum[keep])
    imp, note = layer_importance(dataclasses.replace(result, scores={"features.0": late}), "features.0", None)
    assert imp.filters.tolist() == [f for f in s.filters.tolist() if f != early]
    assert "replayed from a checkpoint" in note
    assert layer_importance(result, "features.0", None)[0].filters.tolist() == s.filters.tolist()


def test_report_refuses_bad_arguments(resnet_run, tmp_path):
    model, result, (x, y) = resnet_run
    with pytest.raises(TypeError, match="write_report: result must be a PruneResult"):
        write_report(result.model, tmp_path)
    with pytest.raises(ValueError, match="write_report: 3 class names"):
        write_report(result, tmp_path, class_names=["a", "b", "c"])
    with pytest.raises(ValueError, match="write_report: heldout has 40 inputs and 39 labels"):
        write_report(result, tmp_path, heldout=(x, y[:-1]))
    assert not os.path.exists(tmp_path / "index.html")


# ---- figures -------------------------------------------------------------------------------------------------
def test_figures_write_pngs_and_refuse_empty_input(rgb_run, tmp_path):
    _, result = rgb_run
    imp = ClassImportance.from_scores(result.scores["features.0"])
    p = figures.classwise_heatmap(imp, tmp_path / "h.png", removed=result.removed["features.0"])
    assert p == os.fspath(tmp_path / "h.png") and open(p, "rb").read(8) == PNG_MAGIC
    p = figures.summary_bars(tmp_path / "s.png", before={"params": 10, "macs": 20}, after={"params": 5, "macs": 20})
    assert open(p, "rb").read(8) == PNG_MAGIC
    with pytest.raises(ValueError, match="accuracy_curves: curves must be a non-empty dict"):
        figures.accuracy_curves({}, tmp_path / "c.png")
    with pytest.raises(ValueError, match="summary_bars: before and after share none"):
        figures.summary_bars(tmp_path / "s2.png", before={"x": 1}, after={"x": 2})
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(p).st_mode & 0o777 == 0o666 & ~umask        # not the private mode of a temp file


# ---- wide layers and compared criteria -------------------------------------------------------------------
def _wide_scores(num_filters=512, num_classes=10, images=200):
    """Synthetic LayerScores of a 512-filter layer (every filter scored on 200 images of 10 classes)."""
    from carfast.scoring.scores import LayerScores
    g = torch.Generator().manual_seed(0)
    totals = torch.full((num_classes,), images // num_classes, dtype=torch.int64)
    base = totals - 2
    correct = (base - torch.randint(-1, 4, (num_filters, num_classes), generator=g)).clamp(0, int(totals[0]))
    return LayerScores("features.8", torch.arange(num_filters), images, totals, base, correct, 300.0,
                       300.0 + torch.rand(num_filters, generator=g, dtype=torch.float64))


def _png_height(path) -> int:
    from matplotlib.image import imread
    return imread(path).shape[0]


def test_heatmap_of_a_wide_layer_stays_bounded(tmp_path):
    scores = _wide_scores()
    imp = ClassImportance.from_scores(scores)
    car = imp.car.tolist()
    order = sorted(range(512), key=lambda i: (-car[i], i))                      # most important first
    removed = order[::-1][:300]                                                 # 300 removed, least important first
    rows, note = figures.heatmap_rows(imp, removed)
    assert len(rows) == figures.HEATMAP_MAX_ROWS == 64
    assert rows[:16] == order[:16] and rows[-16:] == order[-16:]               # the most and least important
    # then the first removed among the rest: the 16 least important were removed first
    assert [i for i in rows if 16 <= order.index(i) < 496] == sorted(removed[16:48], key=order.index)
    assert ("64 of 512 filters shown: the 16 most and 16 least important by CAR and the first 32 removed filters "
            "among the rest (of 284)") in note
    path = figures.classwise_heatmap(imp, tmp_path / "wide.png", removed=removed)
    height = _png_height(path)
    assert height <= round(figures.HEATMAP_MAX_HEIGHT_IN * figures.DPI) < 2000
    # a small layer shows every filter, and says nothing about a selection
    small = ClassImportance.from_scores(_wide_scores(24))
    assert figures.heatmap_rows(small)[1] == "" and len(figures.heatmap_rows(small)[0]) == 24
    assert _png_height(figures.classwise_heatmap(small, tmp_path / "small.png")) < height


def test_report_of_a_wide_layer_captions_what_the_heatmap_shows(rgb_run, tmp_path):
    _, result = rgb_run
    scores = _wide_scores()
    wide = dataclasses.replace(result, scores={"features.8": scores}, kept={"features.8": list(range(256, 512))},
                               removed={"features.8": list(range(256))}, history=[])
    text = _strip_images(open(write_report(wide, tmp_path), encoding="utf-8").read())
    assert "64 of 512 filters shown: the 16 most and 16 least important by CAR" in text
    assert "<details><summary>512 filters, most important first</summary>" in text
    assert _png_height(tmp_path / "classwise_features.8.png") <= round(figures.HEATMAP_MAX_HEIGHT_IN * figures.DPI)


def test_criteria_bars_and_bad_input(tmp_path):
    p = figures.criteria_bars(tmp_path / "c.png", labels=["CAR", "L1 norm", "random"], held_out=[0.88, 0.72, 0.68],
                              selection=[0.9, 0.72, 0.66], unpruned_held_out=0.92, unpruned_selection=0.91,
                              held_out_images=1000)
    assert open(p, "rb").read(8) == PNG_MAGIC
    with pytest.raises(ValueError, match="criteria_bars: one held-out"):
        figures.criteria_bars(tmp_path / "d.png", labels=["a", "b"], held_out=[0.5])


def test_summary_says_kept_and_removed(resnet_run):
    _, result, _ = resnet_run
    text = str(result.summary())
    assert "keep is the share KEPT" in text
    assert re.search(r"\n  layer1\.0\.conv1 filters\s+16 -> 14\s+\(kept 87\.5 %, removed 2\)", text)
