"""The ``carfast`` command."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import carfast
from carfast.cli import main
from carfast.data import cifar10_test

pytestmark = pytest.mark.usefixtures("one_thread")


def test_score_prints_a_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "s.json"
    assert main(["score", "--layer", "layer3.2.conv1", "--n", "40", "--top", "5", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "CAR scores of 'layer3.2.conv1': 64 filters on 40 images" in text
    d = json.loads(out.read_text())
    assert d["layers"][0]["layer"] == "layer3.2.conv1" and len(d["layers"][0]["car"]) == 64


def test_score_group(tmp_path, capsys):
    out = tmp_path / "g.json"
    assert main(["score", "--layer", "layer3.0.conv2", "--group", "--n", "24", "--top", "3", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "producers layer3.0.conv2, layer3.1.conv2, layer3.2.conv2" in text
    d = json.loads(out.read_text())["layers"][0]
    assert d["coupled"] and any(m["layer"] == "linear" and m["role"] == "input" for m in d["members"])
    assert main(["score", "--layer", "conv1", "--n", "10"]) == 2          # without --group: says to use it
    assert "carfast score --group" in capsys.readouterr().err


def test_bad_layer_is_a_plain_error(capsys):
    assert main(["score", "--layer", "layer9.conv1", "--n", "10"]) == 2
    err = capsys.readouterr().err
    assert "carfast score: error:" in err and "not found" in err and "Traceback" not in err


def test_missing_data_file(capsys, tmp_path):
    assert main(["score", "--data", str(tmp_path / "nope.npz")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_version_lists_backends():
    r = subprocess.run([sys.executable, "-m", "carfast.cli", "--version"], capture_output=True, text=True, check=True)
    assert r.stdout.startswith("carfast ") and "torch" in r.stdout
    assert "kernels: closed_form_logits, closed_form_score" in r.stdout      # the cpu backend's, from the registry


# ---- prune / report / demo ---------------------------------------------------------------------------------
SECTIONS = ("<h2>Run settings</h2>", "<h2>Summary</h2>", "<h2>Accuracy while pruning</h2>",
            "<h2>Class-wise CAR: layer1.0.conv1</h2>", "<h3>Per-filter interpretation</h3>", "<h2>Removal history</h2>")


@pytest.mark.parametrize("command", ["score", "prune", "report", "demo"])
def test_each_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: carfast {command}")
    assert command == "score" or "--out" in out
    assert "--quick" not in out                                   # the demo's test switch stays hidden


def test_keep_help_says_it_is_the_share_kept(capsys):
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "what to KEEP per layer, not what to remove" in out
    assert "pruning_ratio" in out and "share REMOVED: --keep 0.75 = pruning_ratio 0.25" in out
    assert "--compare CRITERIA" in out and "--held-out FILE.npz" in out


def _one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"carfast {command}: error: "), err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("argv, expected", [
    (["--layer", "layer9.conv1", "--keep", "3"], "layer 'layer9.conv1' not found"),
    (["--layer", "layer1.0.conv1", "--keep", "30"], "keep=30 for 'layer1.0.conv1' is impossible"),
    (["--layer", "layer1.0.conv1", "--keep", "1.5"], "not a fraction in (0, 1]"),
    (["--layer", "layer1.0.conv1", "--keep", "half"], "'half' is neither a filter count"),
    (["--layer", "layer1.0.conv1", "--keep", "3", "--data", "MISSING"], "no such file"),
    (["--layer", "layer1.0.conv1", "--keep", "3", "--weights", "MISSING"], "no such file"),
    (["--layer", "layer1.0.conv1", "--keep", "3", "--criterion", "l1", "--rule", "lcb"], "--rule lcb is CAR's"),
    (["--layer", "layer1.0.conv1", "--keep", "3", "--delta", "0.1"], "add --search race"),
    (["--layer", "layer1.0.conv1", "--keep", "3", "--search", "race", "--delta", "2"], "--delta must be"),
    (["--layer", "layer1.0.conv1", "--keep", "3", "--search", "race", "--rule", "lcb"], "--rule lcb is not one"),
    (["--layer", "layer1.0.conv1", "--keep", "3", "--search", "race", "--criterion", "l1"], "drop --search"),
])
def test_prune_bad_arguments_exit_2_with_one_line(argv, expected, tmp_path, capsys):
    argv = [str(tmp_path / "nope") if a == "MISSING" else a for a in argv]
    out = tmp_path / "r.pt"
    try:
        code = main(["prune", "--model", "resnet20", "--n", "10", "--out", str(out), *argv])
    except SystemExit as exit_:                                   # argparse's own checks
        code = exit_.code
    assert code == 2
    assert expected in _one_line_error(capsys, "prune")
    assert not out.exists()


def test_prune_with_the_raced_search(tmp_path, capsys):
    out = tmp_path / "r.pt"
    assert main(["prune", "--model", "resnet20", "--layer", "layer1.0.conv1", "--n", "200", "--keep", "14",
                 "--search", "race", "--delta", "0.1", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "CAR's work:" in text and "candidate-image evaluations" in text
    result = carfast.load_pruned(out)
    assert result.settings["search"] == {"method": "race", "delta": 0.1, "epsilon": 0.0, "block": 128,
                                         "strata": 16, "seed": 0}
    assert all(h["evaluations"] <= h["exhaustive"] == (16 - i) * 200 for i, h in enumerate(result.history))


def test_missing_result_and_weights_exit_2(tmp_path, capsys):
    assert main(["prune", "--model", "alexnet", "--weights", str(tmp_path / "none.pt"), "--layer", "features.0",
                 "--keep", "3", "--out", str(tmp_path / "r.pt")]) == 2
    assert "no such file; pass a checkpoint file or leave it out for the bundled weights" in \
        _one_line_error(capsys, "prune")
    assert main(["report", str(tmp_path / "none.pt")]) == 2
    assert "no such file" in _one_line_error(capsys, "report")


def test_prune_then_report(tmp_path, capsys):
    result_path = tmp_path / "run" / "result.pt"
    assert main(["prune", "--model", "resnet20", "--layer", "layer1.0.conv1", "--n", "40", "--keep", "14",
                 "--rule", "accuracy", "--out", str(result_path)]) == 0
    out = capsys.readouterr().out
    assert "layer1.0.conv1 filters" in out and f"wrote {result_path}" in out
    result = carfast.load_pruned(result_path)
    assert len(result.kept["layer1.0.conv1"]) == 14 and result.settings["rule"] == "accuracy"
    assert result.settings["cli_model"] == {"model": "resnet20", "weights": None, "data": None, "n": 40,
                                            "normalization": [[0.485, 0.456, 0.406], [0.229, 0.224, 0.225]]}

    assert main(["report", str(result_path), "--heldout-n", "30"]) == 0
    folder = tmp_path / "run" / "result-report"
    assert f"wrote {folder / 'index.html'}" in capsys.readouterr().out
    page = (folder / "index.html").read_text(encoding="utf-8")
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "IMG", page)
    assert all(s in text for s in SECTIONS)
    assert "latency, 1 image" in text                                   # the original was rebuilt
    pngs = sorted(f for f in os.listdir(folder) if f.endswith(".png"))
    assert pngs == ["accuracy.png", "classwise_layer1.0.conv1.png", "summary.png"]
    assert text.count("src=\"IMG\"") == len(pngs)
    # held out = the 30 bundled images after the 40 scored ones
    d = json.loads((folder / "summary.json").read_text())
    x, y = cifar10_test(70)
    assert d["heldout"]["num_images"] == 30
    assert d["layers"]["layer1.0.conv1"]["classwise"]["class_names"][:2] == ["airplane", "automobile"]
    assert d["heldout"]["accuracy_after"] == carfast.evaluate(result.model, (x[40:], y[40:])).accuracy

    assert main(["report", str(result_path), "--heldout-n", "1961", "--out", str(tmp_path / "r2")]) == 2
    assert "only 1,960 images" in _one_line_error(capsys, "report")


def test_demo_quick_writes_a_new_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--quick"]) == 0
    out = capsys.readouterr().out
    folders = [f for f in os.listdir(tmp_path) if f.startswith("carfast-demo-")]
    assert len(folders) == 1 and re.fullmatch(r"carfast-demo-\d{8}-\d{6}", folders[0])
    folder = tmp_path / folders[0]
    assert (folder / "index.html").exists() and (folder / "result.pt").exists()
    d = json.loads((folder / "summary.json").read_text())
    assert d["heldout"]["num_images"] == 20 and d["settings"]["num_images"] == 20
    assert f"report: {folder / 'index.html'}" in out
    # CAR, L1 and random side by side, measured by the run on the same 20 held-out images
    comp = d["comparison"]
    assert [r["criterion"] for r in comp["rows"]] == ["car", "l1", "random"] and comp["held_out_images"] == 20
    assert comp["unpruned_held_out_accuracy"] == d["heldout"]["accuracy_before"]
    assert comp["rows"][0]["held_out_accuracy"] == d["heldout"]["accuracy_after"]
    x, y = cifar10_test(40)
    for row, label in zip(comp["rows"], ("CAR", "L1 norm", r"random \(seed 0\)")):
        change = 100 * (row["held_out_accuracy"] - comp["unpruned_held_out_accuracy"])
        assert re.search(rf"\n  {label}\s+{100 * row['held_out_accuracy']:.2f}\s+{re.escape(f'{change:+.2f}')} pts\s+"
                         rf"{100 * row['selection_accuracy']:.2f}\n", out)
        assert len(row["removed"]["layer3.2.conv1"]) == 4
    assert re.search(rf"\n  unpruned\s+{100 * comp['unpruned_held_out_accuracy']:.2f}\s+"
                     rf"{100 * comp['unpruned_selection_accuracy']:.2f}\n", out)
    page = (folder / "index.html").read_text(encoding="utf-8")
    assert "<h2>Criteria compared on held-out images</h2>" in page and (folder / "criteria.png").exists()
    # the saved result reports again, with the demo's held-out split and the comparison recorded
    saved = carfast.load_pruned(folder / "result.pt")
    assert saved.settings["cli_model"]["n"] == 20 and saved.comparison["rows"][2]["criterion"] == "random"
    assert comp["rows"][1]["held_out_accuracy"] == carfast.evaluate(
        carfast.prune(carfast.models.cifar_resnet(20), "layer3.2.conv1", (x[:20], y[:20]), keep=60, criterion="l1",
                      progress=False).model, (x[20:], y[20:])).accuracy


def test_demo_quick_alexnet_shows_the_first_layer_filters(tmp_path, capsys):
    assert main(["demo", "--quick", "--model", "alexnet", "--search", "race", "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "bundled AlexNet-style CIFAR-10 network" in out and "features.0: 64 -> 60 filters" in out
    assert re.search(r"features\.0 filters\s+64 -> 60\s+\(kept 93.8 %, removed 4\)", out)
    folder = tmp_path / "a"
    page = (folder / "index.html").read_text(encoding="utf-8")
    assert "<h2>First-layer filters: features.0</h2>" in page
    assert "Raced search (delta 0.05" in page and "of the exact search" in page      # --search race
    assert "<h2>Criteria compared on held-out images</h2>" in page
    for png in ("filters_features.0.png", "filter_classes_features.0.png", "colour_features.0.png", "criteria.png",
                "classwise_features.11.png"):
        assert (folder / png).exists(), png
    d = json.loads((folder / "summary.json").read_text())
    assert d["layers"]["features.0"]["filters"]["weights"] == "original"
    assert len(d["layers"]["features.0"]["filters"]["colour_selectivity"]["removed"]) == 4
    assert carfast.load_pruned(folder / "result.pt").settings["cli_model"]["model"] == "alexnet"


def test_threads_follow_the_idle_cores(monkeypatch):
    from carfast.cli.common import set_threads
    torch.set_num_threads(2)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.2, 0.2))
    assert set_threads(None) is None and torch.get_num_threads() == 2          # idle: torch's default
    monkeypatch.setattr(os, "getloadavg", lambda: (3.1, 3.0, 3.0))
    note = set_threads(None)
    assert torch.get_num_threads() == 1 and "using 1 torch thread instead of 2" in note and "--threads" in note
    torch.set_num_threads(2)
    assert set_threads(1) is None and torch.get_num_threads() == 1             # --threads wins


def test_layers_lists_what_carfast_can_do(tmp_path, capsys):
    out = tmp_path / "l.json"
    assert main(["layers", "--model", "resnet20", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert re.search(r"layer1\.0\.conv1\s+Conv2d\s+16\s+layer", text)
    assert re.search(r"layer2\.1\.conv2\s+Conv2d\s+32\s+group\s+32 channels with layer2\.0\.conv2, "
                     r"layer2\.1\.conv2", text)
    assert re.search(r"linear\s+Linear\s+10\s+refused\s+layer 'linear' produces the model's outputs", text)
    rows = {r["name"]: r for r in json.loads(out.read_text())["layers"]}
    assert rows["conv1"]["status"] == "group" and rows["layer3.2.conv1"]["status"] == "layer"


def test_layers_of_a_users_model(tmp_path, capsys, monkeypatch):
    (tmp_path / "mynet.py").write_text("import torch.nn as nn\n"
                                       "def make():\n"
                                       "    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3),\n"
                                       "        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))\n")
    monkeypatch.chdir(tmp_path)
    assert main(["layers", "--model", "mynet:make", "--input", "3,16,16"]) == 0
    assert "3 layers: 2 alone, 0 in coupling groups, 1 refused" in capsys.readouterr().out
    assert main(["layers", "--model", "nosuch:make"]) == 2
    assert "cannot import it" in capsys.readouterr().err


def _training_npz(tmp_path, packed: bool) -> str:
    """A small training set: 48 CIFAR-10 test images as uint8 x / y, or JPEG-packed (jpeg_bytes, offsets, labels)."""
    import io

    import numpy as np
    x, y = carfast.data.cifar10_test(48, normalization=((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)))
    images = (x.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    path = tmp_path / ("packed.npz" if packed else "xy.npz")
    if not packed:
        np.savez(path, x=images, y=y.numpy())
        return str(path)
    Image = pytest.importorskip("PIL.Image")
    files = []
    for im in images:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="JPEG", quality=75)
        files.append(np.frombuffer(buf.getvalue(), np.uint8))
    offsets = np.cumsum([0] + [len(f) for f in files]).astype(np.int64)
    np.savez(path, jpeg_bytes=np.concatenate(files), offsets=offsets, labels=y.numpy())
    return str(path)


@pytest.mark.parametrize("packed", [False, True])
def test_prune_then_finetune_with_distillation(tmp_path, capsys, packed):
    out, ckpt = tmp_path / "r.pt", tmp_path / "ft.pt"
    data = _training_npz(tmp_path, packed)
    pad = [] if packed else ["--finetune-pad", "reflect"]      # black is the default
    assert main(["prune", "--model", "resnet20", "--layer", "layer1.0.conv1", "--n", "40", "--keep", "14",
                 "--finetune-data", data, "--finetune-epochs", "1", "--finetune-batch-size", "16", "--distill", "0.9",
                 "--bn-stats", "update", "--calibrate", "--finetune-checkpoint", str(ckpt), "--out", str(out),
                 *pad]) == 0
    result = carfast.load_pruned(out)
    assert result.settings["finetune"]["distill"] == 0.9 and result.settings["finetune"]["checkpoint"] == str(ckpt)
    mean, std = carfast.models.cifar.CIFAR_RESNET_NORMALIZATION     # black after the model's normalisation
    black = [-m / s for m, s in zip(mean, std)]     # (written out: the test checks black_fill too)
    assert result.settings["finetune"]["pad_fill"] == (pytest.approx(black) if packed else None)   # None: reflect
    assert result.finetuned_accuracy is not None and ckpt.exists()
    assert "fine-tuned top-1 %" in capsys.readouterr().out


@pytest.mark.parametrize("argv, expected", [
    (["--distill", "0.9"], "--distill set(s) the fine-tune; add --finetune-data"),
    (["--calibrate", "--finetune-epochs", "2"], "--finetune-epochs, --calibrate set(s) the fine-tune"),
    (["--finetune-data", "XY", "--distill", "2"], "fine-tune: distill must be a number in [0, 1]"),
    (["--finetune-data", "MISSING"], "--finetune-data"),
    (["--finetune-pad", "black"], "--finetune-pad set(s) the fine-tune"),
])
def test_prune_finetune_bad_arguments(argv, expected, tmp_path, capsys):
    argv = [_training_npz(tmp_path, False) if a == "XY" else str(tmp_path / "nope.npz") if a == "MISSING" else a
            for a in argv]
    out = tmp_path / "r.pt"
    assert main(["prune", "--model", "resnet20", "--layer", "layer1.0.conv1", "--n", "10", "--keep", "14",
                 "--out", str(out), *argv]) == 2
    assert expected in _one_line_error(capsys, "prune")
    assert not out.exists()
