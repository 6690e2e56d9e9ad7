"""Issue 20 (a fresh clone, a network of one's own): near-chance accuracy warns, the report refuses or flags a
'before' network that is not the one pruned, uint8 data needs a normalisation choice, every message is one
line naming the problem and the fix, and the tables say what they are ranked by and in which unit.

The network is the user's own kind: residual blocks with a depthwise conv and a squeeze-and-excitation gate.
"""
import json
import re
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import carfast
from carfast.cli import main
from carfast.errors import CarfastWarning, NearChanceWarning
from carfast.scoring.checks import near_chance

pytestmark = pytest.mark.usefixtures("one_thread")

MYNET = """
import torch
from torch import nn


class SE(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, 4, 1), nn.Conv2d(4, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), nn.BatchNorm2d(c)
        self.conv3, self.bn3 = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)
        self.se = SE(c)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        return torch.relu(x + self.se(self.bn3(self.conv3(y))))


class MyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.block1, self.block2 = Block(16), Block(16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.block2(self.block1(torch.relu(self.bn(self.stem(x)))))
        return self.head(x.mean((2, 3)))


def make():
    torch.manual_seed(0)
    return MyNet()
"""

N = 160


@pytest.fixture
def project(tmp_path, monkeypatch):
    """mynet.py (make()), its weights w.pt, partial.pt (head.bias missing), wrong.pt (the head's classes
    rolled: another network to the data), d.npz (float inputs, labels the model mostly gets right), bad.npz
    (labels it always gets wrong), u8.npz (uint8 images), gray.npz (one channel) and notes.npz (text)."""
    (tmp_path / "mynet.py").write_text(MYNET)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("mynet", None)
    import mynet
    model = mynet.make().eval()
    state = model.state_dict()
    torch.save(state, tmp_path / "w.pt")
    torch.save({k: v for k, v in state.items() if k != "head.bias"}, tmp_path / "partial.pt")
    wrong = dict(state, **{"head.weight": state["head.weight"].roll(1, 0), "head.bias": state["head.bias"].roll(1)})
    torch.save(wrong, tmp_path / "wrong.pt")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, 3, 8, 8, generator=g)
    with torch.no_grad():
        pred = model(x).argmax(1)
    y = pred.clone()
    y[::5] = torch.randint(0, 10, (N // 5,), generator=g)
    np.savez(tmp_path / "d.npz", x=x.numpy(), y=y.numpy())
    np.savez(tmp_path / "bad.npz", x=x.numpy(), y=((pred + 1) % 10).numpy())
    np.savez(tmp_path / "u8.npz", x=(np.random.default_rng(0).random((N, 8, 8, 3)) * 255).astype(np.uint8),
             y=y.numpy())
    np.savez(tmp_path / "gray.npz", x=x[:, :1].numpy(), y=y.numpy())
    (tmp_path / "notes.npz").write_text("these are my notes, not arrays\n")
    return tmp_path, model, x, y, (pred + 1) % 10


def _err(capsys, command):
    """The one error line of a failed command (notes aside)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith("note:")]
    assert len(lines) == 1 and lines[0].startswith(f"carfast {command}: error: "), err
    return lines[0]


def _near(record):
    return [w for w in record if issubclass(w.category, NearChanceWarning)]


# ---- item 2: silent garbage ------------------------------------------------------------------------------
def test_near_chance_rule():
    """Near chance: at most chance + min(chance / 2, 5 points), on at least 100 images."""
    assert near_chance(0.15, 100, 10) and not near_chance(0.151, 100, 10) and not near_chance(0.0, 99, 10)
    assert near_chance(0.55, 1000, 2) and not near_chance(0.56, 1000, 2)
    assert near_chance(0.0015, 1000, 1000) and not near_chance(0.002, 1000, 1000)
    assert near_chance(0.55, 500, 10, topk=5) and not near_chance(0.56, 500, 10, topk=5)
    assert not near_chance(0.0, 500, 5, topk=5)                        # top-5 of 5 classes: always right


def test_near_chance_warns_once_per_call_with_the_causes(project):
    _, model, x, y, bad = project
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        carfast.score_layer(model, "block1.conv1", (x, bad), progress=False)
    (w,) = _near(record)
    text = str(w.message)
    assert "\n" not in text and text.startswith("score_layer: the model's accuracy on the scoring data is 0.00 %")
    assert all(s in text for s in ("near chance (10.00 % for 10 classes)", "weights", "normalised", "labels"))
    for call in (lambda: carfast.prune(model, "block1.conv1", (x, bad), keep=14, progress=False),
                 lambda: carfast.compare_criteria(model, "block1.conv1", (x[:120], bad[:120]), (x[120:], bad[120:]),
                                                  14, ["car", "l1"], progress=False),
                 lambda: [s.score() for s in [carfast.LayerScorer(model, "block1.conv1", (x, bad))] * 2]):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            call()
        assert len(_near(record)) == 1, [str(w.message) for w in record]
    with warnings.catch_warnings(record=True) as record:        # a network that knows the data, or too few images
        warnings.simplefilter("always")
        carfast.score_layer(model, "block1.conv1", (x, y), progress=False)
        carfast.score_layer(model, "block1.conv1", (x[:99], bad[:99]), progress=False)
    assert not _near(record)


def test_cli_prints_the_near_chance_warning_once(project, capsys):
    assert main(["score", "--model", "mynet:make", "--weights", "w.pt", "--data", "bad.npz", "--layer",
                 "block1.conv1", "--layer", "block2.conv1", "--top", "2"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(lines) == 1 and lines[0].startswith("carfast score: warning: score_layer: the model's accuracy")


def test_uint8_data_for_ones_own_model_needs_a_normalisation_choice(project, capsys):
    base = ["score", "--model", "mynet:make", "--weights", "w.pt", "--layer", "block1.conv1", "--top", "1"]
    for data in (["--data", "u8.npz"], []):                       # a file, and the bundled CIFAR-10 slice
        assert main(base + data) == 2
        line = _err(capsys, "score")
        assert "holds uint8 images and --model mynet:make is your own network" in line
        assert "pass --normalize MEAN/STD" in line and "none (only scaled to [0, 1])" in line
    assert main(base + ["--data", "u8.npz", "--normalize", "none"]) == 0
    assert main(base + ["--data", "d.npz"]) == 0                  # float inputs are the model's input as they are
    assert main(["score", "--layer", "layer3.2.conv1", "--n", "10", "--top", "1"]) == 0    # bundled: known


def test_report_refuses_a_factory_without_weights_and_flags_another_before(project, capsys):
    folder, model, x, y, _ = project
    assert main(["prune", "--model", "mynet:make", "--weights", "w.pt", "--data", "d.npz", "--n", "100",
                 "--layer", "block1.conv1", "--keep", "14", "--out", "r.pt"]) == 0
    capsys.readouterr()
    carfast.prune(model, "block1.conv1", (x[:100], y[:100]), keep=14, progress=False).save("py.pt")
    # saved from Python: no record of the weights, so --model without --weights is refused
    assert main(["report", "py.pt", "--model", "mynet:make", "--data", "d.npz"]) == 2
    line = _err(capsys, "report")
    assert "--model mynet:make without --weights" in line and "pass --weights" in line
    # the run's own --model: its recorded weights
    assert main(["report", "r.pt", "--model", "mynet:make", "--out", "a"]) == 0
    assert "using the weights the run recorded" in capsys.readouterr().err
    # other weights: the 'before' network disagrees with the accuracy the result records
    assert main(["report", "r.pt", "--model", "mynet:make", "--weights", "wrong.pt", "--out", "b"]) == 0
    err = capsys.readouterr().err
    exact = [line for line in err.splitlines() if "on the 100 images the run scored on" in line]
    assert len(exact) == 1 and exact[0].startswith("carfast report: warning: the original network (mynet:make)")
    assert "but the result records" in exact[0]
    assert main(["report", "py.pt", "--model", "mynet:make", "--weights", "wrong.pt", "--data", "d.npz",
                 "--out", "c"]) == 0
    assert "too far apart for chance" in capsys.readouterr().err
    d = json.loads((folder / "c" / "summary.json").read_text())
    page = (folder / "c" / "index.html").read_text(encoding="utf-8")
    assert len(d["warnings"]) == 1 and "Warning: The original network given" in page
    assert main(["report", "py.pt", "--model", "mynet:make", "--weights", "w.pt", "--data", "d.npz",
                 "--out", "e"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert json.loads((folder / "e" / "summary.json").read_text())["warnings"] == []


# ---- item 5: messages ------------------------------------------------------------------------------------
def test_wrong_input_channels_is_one_line_without_a_traceback(project, capfd):
    _, model, x, y, _ = project
    with pytest.raises(ValueError) as err:
        carfast.score_layer(model, "block1.conv1", (x[:, :1], y), progress=False)
    text = str(err.value)
    assert "\n" not in text and "layer 'stem' (Conv2d) takes 3 input channels but gets 1" in text
    assert "carfast.adapt" not in text and "pass inputs of the shape" in text
    assert "Traceback" not in capfd.readouterr().err                 # torch.fx's ShapeProp prints none
    assert main(["score", "--model", "mynet:make", "--weights", "w.pt", "--data", "gray.npz",
                 "--layer", "block1.conv1"]) == 2
    assert "takes 3 input channels but gets 1" in _err(capfd, "score")
    flat = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    with pytest.raises(ValueError, match=r"layer '3' \(Linear\) takes 144 input features but gets 256"):
        carfast.score_layer(flat, "0", (torch.randn(4, 3, 10, 10), torch.zeros(4, dtype=torch.long)))
    assert main(["layers", "--model", "mynet:make", "--input", "1,8,8"]) == 2
    assert "takes 3 input channels but gets 1" in _err(capfd, "layers")


def test_weights_that_do_not_fit_name_the_missing_keys(project, capsys):
    assert main(["score", "--model", "mynet:make", "--weights", "partial.pt", "--data", "d.npz"]) == 2
    line = _err(capsys, "score")
    assert "does not fit mynet:make (missing 1 key(s): head.bias)" in line and "torch.save(model.state_dict()" in line


def test_a_text_file_as_data_is_not_an_npz(project, capsys):
    assert main(["score", "--model", "mynet:make", "--weights", "w.pt", "--data", "notes.npz", "--layer",
                 "block1.conv1"]) == 2
    line = _err(capsys, "score")
    assert "notes.npz is not an .npz file" in line and "numpy.savez" in line and "pickle" not in line
    with pytest.raises(ValueError, match=r"is not an \.npz file") as err:
        carfast.data.load_npz("notes.npz")
    assert "pickle" not in str(err.value)


def _suggested(text):
    m = re.search(r"did you mean (.*?)\?", text)
    return [s.strip(" '") for s in m.group(1).split(",")] if m else []


def test_did_you_mean_suggests_only_layers_carfast_scores(project, capsys):
    _, model, x, y, _ = project
    convs = {n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert main(["score", "--model", "mynet:make", "--weights", "w.pt", "--data", "d.npz", "--layer",
                 "block1.bn"]) == 2
    line = _err(capsys, "score")
    assert set(_suggested(line)) <= convs and "block1.bn3" not in line
    with pytest.raises(ValueError) as err:
        carfast.prune(model, "block1.conv", (x, y), keep=4)
    text = str(err.value)
    assert _suggested(text) and set(_suggested(text)) <= convs
    assert "carfast.layers(model) lists the layers carfast can score" in text and "named_modules" not in text
    with pytest.raises(ValueError, match=r"not found in the model; carfast\.layers\(model\) lists"):
        carfast.prune(model, "zzz", (x, y), keep=4)


def test_layers_prints_whole_reasons(project, capsys):
    assert main(["layers", "--model", "mynet:make", "--weights", "w.pt"]) == 0
    (head,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("head ")]
    assert "refused" in head and head.endswith("the output layer cannot be pruned: score the layers before it")


def test_backend_cpu_says_why_it_ran_torch(project):
    _, model, x, y, _ = project
    asked = carfast.score_layer(model, "block1.conv1", (x, y), backend="cpu", progress=False)
    assert asked.method == "suffix" and asked.backend == "torch"
    assert "backend 'cpu' has no kernel for the ops of the suffix method" in asked.backend_note
    assert f"backend torch: {asked.backend_note}" in asked.table()
    assert carfast.score_layer(model, "block1.conv1", (x, y), progress=False).backend_note == ""


def test_report_with_another_networks_model_says_which_was_pruned(project, capsys):
    assert main(["prune", "--model", "mynet:make", "--weights", "w.pt", "--data", "d.npz", "--n", "100",
                 "--layer", "block1.conv1", "--keep", "15", "--out", "r.pt"]) == 0
    assert main(["report", "r.pt", "--model", "resnet20"]) == 2
    line = _err(capsys, "report")
    assert "was pruned from your network mynet:make (the run's --model), not resnet20" in line
    assert "pass --model mynet:make" in line
    x, y = carfast.data.cifar10_test(20)
    carfast.prune(carfast.models.cifar_resnet(20), "layer3.2.conv1", (x, y), keep=63, progress=False).save("r20.pt")
    assert main(["report", "r20.pt", "--model", "alexnet"]) == 2
    assert "was pruned from resnet20, not alexnet; pass --model resnet20 or leave --model out" in _err(capsys, "report")


def test_load_pruned_of_ones_own_network(project, capsys):
    folder, model, _, _, _ = project
    assert main(["prune", "--model", "mynet:make", "--weights", "w.pt", "--data", "d.npz", "--n", "100",
                 "--layer", "block1.conv1", "--keep", "15", "--out", "r.pt"]) == 0
    with pytest.raises(ValueError) as err:
        carfast.load_pruned("r.pt")
    text = str(err.value)
    assert "\n" not in text and "load_pruned('r.pt', model=mynet.make())" in text
    import mynet
    result = carfast.load_pruned("r.pt", model=mynet.make())       # the way the message names: it reloads
    assert result.model.block1.conv1.out_channels == 15 and len(result.kept["block1.conv1"]) == 15


# ---- item 6: numbers that confuse ------------------------------------------------------------------------
def test_tables_say_their_order_and_units(project, capsys):
    _, model, x, y, _ = project
    assert main(["score", "--model", "mynet:make", "--weights", "w.pt", "--data", "d.npz", "--layer",
                 "block1.conv1", "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "order: least important first, by loss + smallest first (not by CAR): rule 'loss'" in out
    assert "units: accuracy % and CAR % in percent (CAR % = 100 x .car, which is a fraction" in out
    result = carfast.prune(model, "block1.conv1", (x[:100], y[:100]), keep=15, progress=False)
    text = str(result.summary())
    assert "\ntop-1 % (100 scoring images)  " in text


@pytest.mark.parametrize("pruned_ms, within", [(1.61, True), (0.5, False)])
def test_report_latency_shows_the_spread_and_noise(pruned_ms, within, project, tmp_path, monkeypatch):
    """A ratio inside the run-to-run spread is labelled noise, not a finding; a clear one is not."""
    _, model, x, y, _ = project
    result = carfast.prune(model, "block1.conv1", (x[:100], y[:100]), keep=15, progress=False)
    runs = {"before": iter([1.0, 3.0] * 20), "after": iter([pruned_ms, pruned_ms + 0.1] * 20)}
    import carfast.report.page as page
    monkeypatch.setattr(page, "latency", lambda m, ex, repeats, warmup: 1e-3 * next(
        runs["before" if m is model else "after"]))
    index = carfast.write_report(result, tmp_path / "rep", original=model, heldout=(x[100:], y[100:]))
    d = json.loads((tmp_path / "rep" / "summary.json").read_text())["latency_s"]
    assert d["repeats"] == 20 and d["within_noise"] is within and len(d["before_range"]) == 2
    html = open(index, encoding="utf-8").read()
    assert "median of 20 runs each, alternating; middle half of the runs in brackets" in html
    assert ("within run-to-run noise" in html) is within and ("(within noise)" in html) is within


def test_carfast_warnings_are_user_warnings():
    assert issubclass(NearChanceWarning, CarfastWarning) and issubclass(CarfastWarning, UserWarning)
