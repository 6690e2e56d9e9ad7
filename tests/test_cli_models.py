"""The ``carfast`` command with a user's network and data, coupling groups, and the progress lines."""
import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import carfast
from carfast.cli import main
from carfast.progress import Progress

MYNET = """
import torch
from torch import nn


def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))
"""


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def user_project(tmp_path, monkeypatch):
    """A folder with mynet.py (make()), trained-looking weights and an npz of float inputs with classes."""
    (tmp_path / "mynet.py").write_text(MYNET)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("mynet", None)
    import mynet
    model = mynet.make().eval()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(60, 3, 12, 12, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[::4] = torch.randint(0, 4, (15,), generator=g)
    np.savez(tmp_path / "d.npz", x=x.numpy(), y=y.numpy(), classes=np.array(["a", "b", "c", "d"]))
    return tmp_path, model, x, y


def _err(capsys, command):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith("note:")]
    assert len(lines) == 1 and lines[0].startswith(f"carfast {command}: error: "), err
    return lines[0]


def test_prune_and_report_a_users_model(user_project, capsys):
    folder, model, x, y = user_project
    assert main(["prune", "--model", "mynet:make", "--weights", "w.pt", "--layer", "0", "--keep", "5",
                 "--data", "d.npz", "--n", "40", "--out", "r.pt", "--threads", "1"]) == 0
    assert re.search(r"\n  0 filters\s+8 -> 5\s+\(kept 62\.5 %, removed 3\)", capsys.readouterr().out)
    result = carfast.load_pruned("r.pt", model=model)
    assert result.settings["cli_model"]["model"] == "mynet:make" and result.settings["cli_model"]["n"] == 40
    ref = carfast.prune(model, "0", (x[:40], y[:40]), keep=5, progress=False)
    assert result.removed == ref.removed
    assert main(["report", "r.pt", "--threads", "1"]) == 0              # rebuilt from the recorded --model
    d = json.loads((folder / "r-report" / "summary.json").read_text())
    assert d["heldout"]["num_images"] == 20                              # the 20 images after the scored 40
    assert d["layers"]["0"]["classwise"]["class_names"] == ["a", "b", "c", "d"]


def test_report_of_a_result_saved_from_python(tmp_path, capsys):
    model = carfast.models.cifar_resnet(20)
    x, y = carfast.data.cifar10_test(60)
    carfast.prune(model, "layer3.2.conv1", (x[:30], y[:30]), keep=62, progress=False).save(tmp_path / "p.pt")
    assert main(["report", str(tmp_path / "p.pt"), "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "pass --model and --weights" in err and "pass --data" in err
    npz = tmp_path / "held.npz"
    x8 = (np.random.default_rng(0).random((12, 32, 32, 3)) * 255).astype(np.uint8)
    np.savez(npz, x=x8, y=np.arange(12) % 10)
    assert main(["report", str(tmp_path / "p.pt"), "--model", "resnet20", "--data", str(npz),
                 "--out", str(tmp_path / "b")]) == 0
    page = (tmp_path / "b" / "index.html").read_text(encoding="utf-8")
    assert "latency, 1 image" in page
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["heldout"]["num_images"] == 12


def test_report_needs_the_model_of_a_users_network(user_project, capsys):
    _, model, x, y = user_project
    carfast.prune(model, "0", (x, y), keep=7, progress=False).save("p.pt")
    assert main(["report", "p.pt"]) == 2
    assert "pass --model package.module:factory" in _err(capsys, "report")
    # without --weights the 'before' network would have make()'s own weights: refused (issue 20)
    assert main(["report", "p.pt", "--model", "mynet:make", "--data", "d.npz"]) == 2
    assert "--model mynet:make without --weights" in _err(capsys, "report")
    assert main(["report", "p.pt", "--model", "mynet:make", "--weights", "w.pt", "--data", "d.npz"]) == 0


def test_report_of_a_wrong_file_is_one_line(tmp_path, capsys):
    (tmp_path / "x.pt").write_bytes(b"not a torch file at all")
    assert main(["report", str(tmp_path / "x.pt")]) == 2
    assert "is not a file carfast wrote" in _err(capsys, "report")
    torch.save({"a": 1}, tmp_path / "y.pt")
    assert main(["report", str(tmp_path / "y.pt")]) == 2
    assert "not a carfast pruned model" in _err(capsys, "report")


@pytest.mark.parametrize("argv, expected", [
    (["score", "--layer", "layer9.conv1", "--n", "10"], "carfast layers --model resnet20 lists them"),
    (["score", "--layer", "bn1", "--n", "10"], "it is a BatchNorm2d"),
    (["score", "--n", "3000"], "the bundled CIFAR-10 slice holds 2,000 images"),
    (["score", "--data", "MISSING"], "no such file; pass an .npz file with x: uint8 images"),
    (["score", "--normalize", "1,2/3"], "as many means as stds"),
    (["score", "--model", "nosuch:make"], "cannot import it"),
    (["score", "--model", "vgg"], "not a bundled model"),
])
def test_cli_errors_speak_cli(argv, expected, tmp_path, capsys):
    argv = [str(tmp_path / "nope.npz") if a == "MISSING" else a for a in argv]
    assert main(argv) == 2
    line = _err(capsys, argv[0])
    assert expected in line and "path=" not in line and "named_modules" not in line


def test_help_gives_the_data_format_and_every_command_takes_threads(capsys):
    for command in ("score", "prune", "report", "demo", "layers"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert "--threads" in out, command
        if command != "demo":
            assert "package.module:factory" in out, command
        if command in ("score", "prune", "report"):
            assert "x: uint8 images [N, H, W, C]" in out and "y: int labels [N]" in out and "classes" in out
    assert main(["score", "--threads", "1", "--n", "10", "--layer", "layer3.2.conv1", "--top", "1"]) == 0


def test_resnet56_group_and_block_convs_end_to_end(tmp_path):
    """carfast prune --model resnet56 with a residual group and two block convs, keeping 75 %; the saved
    result reloads in a fresh process and carfast report draws it."""
    out = tmp_path / "r56.pt"
    cmd = [sys.executable, "-m", "carfast", "prune", "--model", "resnet56", "--layer", "layer3.8.conv2",
           "--layer", "layer1.0.conv1", "--layer", "layer2.0.conv1", "--keep", "0.75", "--n", "24",
           "--threads", "1", "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stderr
    assert re.search(r"layer3\.8\.conv2 group channels\s+64 -> 48\s+\(kept 75 %, removed 16\)", run.stdout)
    check = ("import carfast, json; r = carfast.load_pruned(%r); m = r.model; "
             "print(json.dumps([m.conv1.out_channels, m.layer3[8].conv2.out_channels, m.layer3[0].conv2.out_channels,"
             " m.layer1[0].conv1.out_channels, m.layer2[0].conv1.out_channels, r.settings['groups']]))" % str(out))
    fresh = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300)
    assert json.loads(fresh.stdout) == [16, 48, 48, 12, 24, ["layer3.8.conv2"]], fresh.stderr
    rep = subprocess.run([sys.executable, "-m", "carfast", "report", str(out), "--heldout-n", "24", "--threads", "1"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert rep.returncode == 0, rep.stderr
    folder = tmp_path / "r56-report"
    pngs = sorted(f for f in os.listdir(folder) if f.endswith(".png"))
    assert "classwise_layer3.8.conv2.png" in pngs and "classwise_layer1.0.conv1.png" in pngs
    assert "layer3.8.conv2 was pruned as its coupling group" in (folder / "index.html").read_text(encoding="utf-8")


class _Stderr(io.StringIO):
    def __init__(self, tty):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


@pytest.mark.parametrize("tty", [True, False])
def test_progress_bar_and_lines(tty, monkeypatch):
    err = _Stderr(tty)
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr("carfast.progress.LINE_SECONDS", 0.0)
    clock = iter(float(t) for t in range(100))
    monkeypatch.setattr("carfast.progress.time.perf_counter", lambda: next(clock))
    bar = Progress(None, 4, "pruning", unit="channels")
    for _ in range(4):
        bar.update(1)
    bar.close()
    text = err.getvalue()
    if tty:       # one bar redrawn in place, with elapsed time and the time left
        assert text.count("\n") == 1 and "\r" in text and "0:01 elapsed, ~0:03 left" in text
    else:         # separate lines a log or a notebook shows
        lines = text.splitlines()
        assert lines[0] == "carfast: pruning 1/4 channels (25.0 %), 0:01 elapsed, ~0:03 left"
        assert lines[-1] == "carfast: pruning 4/4 channels (100.0 %), 0:04 elapsed"
    monkeypatch.setenv("CARFAST_PROGRESS", "0")
    quiet = Progress(None, 4, "pruning")
    quiet.update(4)
    assert err.getvalue() == text
