"""Greedy pruning: the removal order equals the naive greedy loop; schedules, stopping, criteria, resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from naive import naive_greedy, naive_logits
from nets import NETS, make_data

import carfast
from carfast.criteria import l1_norm
from carfast.data import cifar10_test
from carfast.models import cifar_resnet
from carfast.scoring.selection import DEFAULT_RULE, RULES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def resnet20():
    return cifar_resnet(20)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _masked_logits(model, consumers, x, removed):
    return naive_logits(model, consumers, x, None, removed=removed)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("layer,consumer,n,steps", [
    ("layer1.0.conv1", "layer1.0.conv2", 120, 2),      # suffix method
    ("layer3.2.conv1", "layer3.2.conv2", 64, 2),       # closed form
])
def test_greedy_equals_naive_loop_on_real_layer(resnet20, layer, consumer, n, steps, rule):
    x, y = cifar10_test(n)
    before = _state(resnet20)
    num = resnet20.get_submodule(layer).out_channels
    result = carfast.prune(resnet20, layer, (x, y), keep=num - steps, rule=rule, progress=False)
    naive = naive_greedy(resnet20, {consumer: 1}, x, y, num, steps, rule=rule)
    assert result.removed[layer] == [s["filter"] for s in naive]
    assert [r["correct"] for r in result.history] == [s["correct"] for s in naive]
    for r, s in zip(result.history, naive):
        assert r["loss"] * n == pytest.approx(s["loss_sum"], rel=1e-5)
    assert sorted(result.kept[layer] + result.removed[layer]) == list(range(num))
    # the physically pruned model computes what the masked original computes
    want = _masked_logits(resnet20, {consumer: 1}, x[:32], result.removed[layer])
    with torch.no_grad():
        got = result.model(x[:32])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert result.model.get_submodule(layer).out_channels == num - steps
    assert _same_state(before, resnet20.state_dict())


@pytest.mark.parametrize("name", ["alexnet_head", "untraceable", "classifier_consumer", "mobilenet_chain"])
def test_greedy_equals_naive_loop_on_synthetic_nets(name):
    case = NETS[name]()
    x, y = make_data(case, 96)
    num = carfast.graph.target_num_filters(case.model.get_submodule(case.layer))
    steps = min(3, num - 1)
    result = carfast.prune(case.model, case.layer, (x, y), keep=num - steps, progress=False)
    naive = naive_greedy(case.model, case.consumers, x, y, num, steps, rule=DEFAULT_RULE)
    assert result.removed[case.layer] == [s["filter"] for s in naive]
    assert [r["correct"] for r in result.history] == [s["correct"] for s in naive]


def test_step_removes_the_best_of_one_scoring(resnet20):
    x, y = cifar10_test(60)
    s = carfast.score_layer(resnet20, "layer1.0.conv1", (x, y))
    result = carfast.prune(resnet20, "layer1.0.conv1", (x, y), keep=12, step=2, rule="accuracy", progress=False)
    first = s.ranking("accuracy")[:2].tolist()
    assert result.removed["layer1.0.conv1"][:2] == first
    assert len(result.history) == 4 and [r["iteration"] for r in result.history] == [0, 0, 1, 1]
    assert result.model.layer1[0].conv1.out_channels == 12


def test_sequential_two_layers_and_summary(resnet20):
    x, y = cifar10_test(60)
    layers = ["layer1.0.conv1", "layer3.1.conv1"]
    result = carfast.prune(resnet20, layers, (x, y), keep={"layer1.0.conv1": 14, "layer3.1.conv1": 0.97},
                           progress=False)
    assert [r["layer"] for r in result.history] == ["layer1.0.conv1"] * 2 + ["layer3.1.conv1"] * 2
    assert len(result.kept["layer3.1.conv1"]) == 62
    summary = result.summary()
    assert summary.params_after < summary.params_before and summary.macs_after < summary.macs_before
    assert summary.filters_after == {"layer1.0.conv1": 14, "layer3.1.conv1": 62}
    assert summary.accuracy_after == result.history[-1]["accuracy"]
    ev = carfast.evaluate(result.model, (x, y))
    assert ev.correct == result.history[-1]["correct"]
    assert "params" in str(summary)


def test_global_picks_the_best_filter_across_layers(resnet20):
    x, y = cifar10_test(40)
    layers = ["layer1.0.conv1", "layer2.0.conv1"]
    result = carfast.prune(resnet20, layers, (x, y), keep={"layer1.0.conv1": 15, "layer2.0.conv1": 31},
                           schedule="global", rule="accuracy", progress=False)
    scores = [carfast.score_layer(resnet20, name, (x, y)) for name in layers]
    best = min(((-int(s.correct[i].sum()), float(s.loss_sum[i]), li, int(s.filters[i]))
                for li, s in enumerate(scores) for i in range(len(s.filters))))
    first = result.history[0]
    assert (first["layer"], first["filter"]) == (layers[best[2]], best[3])
    assert first["correct"] == -best[0]
    assert len(result.history) == 2 and {r["layer"] for r in result.history} == set(layers)


def test_max_accuracy_drop_stops_before_the_drop(resnet20):
    x, y = cifar10_test(100)
    base = carfast.evaluate(resnet20, (x, y)).accuracy
    result = carfast.prune(resnet20, "layer3.2.conv1", (x, y), keep=1, max_accuracy_drop=0.0, rule="accuracy",
                           progress=False)
    assert all(r["accuracy"] >= base for r in result.history)
    assert len(result.kept["layer3.2.conv1"]) > 1          # stopped early
    nxt = carfast.score_layer(result.model, "layer3.2.conv1", (x, y))
    assert float(nxt.accuracy.max()) < base                 # the next removal would have dropped accuracy
    # the default (loss) rule stops before its own pick would cross the budget
    by_loss = carfast.prune(resnet20, "layer3.2.conv1", (x, y), keep=1, max_accuracy_drop=0.0, progress=False)
    assert all(r["accuracy"] >= base for r in by_loss.history) and len(by_loss.kept["layer3.2.conv1"]) > 1
    pick = carfast.score_layer(by_loss.model, "layer3.2.conv1", (x, y))
    assert float(pick.accuracy[pick.filters.tolist().index(int(pick.ranking()[0]))]) < base
    stop = result.stops["layer3.2.conv1"]
    assert stop["reason"] == "max_accuracy_drop" and stop["remaining"] == len(result.kept["layer3.2.conv1"])
    assert "layer3.2.conv1: stopped at" in str(result.summary())


@pytest.mark.parametrize("schedule", ["sequential", "global"])
def test_a_budget_per_layer_stops_only_that_layer(resnet20, schedule):
    """A layer that hits its budget stops; the next layer still prunes (with no budget, to its keep)."""
    x, y = cifar10_test(60)
    layers = ["layer3.2.conv1", "layer1.0.conv1"]
    result = carfast.prune(resnet20, layers, (x, y), keep={"layer3.2.conv1": 1, "layer1.0.conv1": 14},
                           max_accuracy_drop={"layer3.2.conv1": 0.0, "layer1.0.conv1": None}, schedule=schedule,
                           progress=False)
    assert "layer3.2.conv1" in result.stops and "layer1.0.conv1" not in result.stops
    assert len(result.kept["layer1.0.conv1"]) == 14 and len(result.kept["layer3.2.conv1"]) > 1


def test_criterion_runs_through_the_same_loop(resnet20):
    x, y = cifar10_test(50)
    result = carfast.prune(resnet20, "layer2.0.conv1", (x, y), keep=28, criterion="l1", progress=False)
    l1 = l1_norm(resnet20, "layer2.0.conv1")
    assert result.removed["layer2.0.conv1"] == torch.argsort(l1, stable=True)[:4].tolist()
    assert result.settings["criterion"] == "l1_norm"
    ev = carfast.evaluate(result.model, (x, y))
    assert ev.correct == result.history[-1]["correct"]
    custom = carfast.prune(resnet20, "layer2.0.conv1", (x, y), keep=30, progress=False,
                           criterion=lambda m, layer, d: torch.arange(m.get_submodule(layer).out_channels).flip(0))
    assert custom.removed["layer2.0.conv1"] == [31, 30]


def test_save_and_load_in_a_fresh_process(resnet20, tmp_path):
    x, y = cifar10_test(30)
    result = carfast.prune(resnet20, "layer1.1.conv1", (x, y), keep=14, progress=False)
    path = tmp_path / "pruned.pt"
    result.save(path)
    with torch.no_grad():
        want = result.model(x[:8])
    torch.save(x[:8], tmp_path / "x.pt")
    code = textwrap.dedent(f"""
        import torch, carfast
        r = carfast.load_pruned({str(path)!r})
        x = torch.load({str(tmp_path / 'x.pt')!r}, weights_only=True)
        with torch.no_grad():
            torch.save(r.model(x), {str(tmp_path / 'out.pt')!r})
        assert r.removed == {result.removed!r}, r.removed
        print(r.summary())
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert torch.equal(torch.load(tmp_path / "out.pt", weights_only=True), want)
    back = carfast.load_pruned(path)
    assert back.history == result.history and back.kept == result.kept


_LAYERS = ["layer1.0.conv1", "layer3.2.conv1"]
_KEEP = {"layer1.0.conv1": 10, "layer3.2.conv1": 58}       # 6 + 6 removals
_KILLED_RUN = """
import sys, torch, carfast
torch.set_num_threads(1)
x, y = carfast.data.cifar10_test(128)
carfast.prune(carfast.models.cifar_resnet(20), ["layer1.0.conv1", "layer3.2.conv1"], (x, y), keep=KEEP, step={step},
              checkpoint=sys.argv[1], progress=False)
"""


@pytest.mark.parametrize("step", [1, 3])
def test_resume_after_kill_gives_the_same_result(resnet20, tmp_path, step):
    x, y = cifar10_test(128)
    ckpt = tmp_path / "run.json"
    code = _KILLED_RUN.format(step=step).replace("KEEP", repr(_KEEP))
    proc = subprocess.Popen([sys.executable, "-c", code, str(ckpt)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    rows = 0
    try:
        while time.time() < deadline and proc.poll() is None:
            if ckpt.exists():
                rows = len(json.loads(ckpt.read_text())["history"])
                if rows >= 4:
                    break
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert 4 <= rows < 12, f"the run was not killed mid-way ({rows} removals recorded)"
    torch.set_num_threads(1)
    try:
        resumed = carfast.prune(resnet20, _LAYERS, (x, y), keep=_KEEP, step=step, checkpoint=ckpt, progress=False)
        fresh = carfast.prune(resnet20, _LAYERS, (x, y), keep=_KEEP, step=step, progress=False)
    finally:
        torch.set_num_threads(2)
    assert resumed.removed == fresh.removed
    assert [r["correct"] for r in resumed.history] == [r["correct"] for r in fresh.history]
    for a, b in zip(resumed.model.state_dict().values(), fresh.model.state_dict().values()):
        assert torch.equal(a, b)


def test_resume_redoes_an_iteration_cut_short(resnet20, tmp_path):
    x, y = cifar10_test(50)
    ckpt = tmp_path / "run.json"
    full = carfast.prune(resnet20, "layer1.0.conv1", (x, y), keep=10, step=3, checkpoint=ckpt, progress=False)
    saved = json.loads(ckpt.read_text())
    saved["history"] = saved["history"][:4]               # killed after the first removal of iteration 1
    ckpt.write_text(json.dumps(saved))
    again = carfast.prune(resnet20, "layer1.0.conv1", (x, y), keep=10, step=3, checkpoint=ckpt, progress=False)
    assert again.removed == full.removed and again.history[:3] == full.history[:3]


def test_checkpoint_from_other_settings_is_refused(resnet20, tmp_path):
    x, y = cifar10_test(40)
    ckpt = tmp_path / "run.json"
    carfast.prune(resnet20, "layer1.0.conv1", (x, y), keep=15, checkpoint=ckpt, progress=False)
    with pytest.raises(ValueError, match="other settings.*step"):
        carfast.prune(resnet20, "layer1.0.conv1", (x, y), keep=15, step=2, checkpoint=ckpt, progress=False)
    with pytest.raises(ValueError, match="data_digest"):
        carfast.prune(resnet20, "layer1.0.conv1", (x[:39], y[:39]), keep=15, checkpoint=ckpt, progress=False)
    glob = tmp_path / "global.json"
    carfast.prune(resnet20, "layer1.0.conv1", (x, y), keep=15, schedule="global", checkpoint=glob, progress=False)
    with pytest.raises(ValueError, match="global schedule cannot be continued"):
        carfast.prune(resnet20, "layer1.0.conv1", (x, y), keep=14, schedule="global", checkpoint=glob, progress=False)


def test_a_finished_run_continues_to_a_smaller_keep(resnet20, tmp_path):
    """Sequential: the recorded removals are replayed and the run goes on; the result equals a fresh run."""
    x, y = cifar10_test(50)
    layers = ["layer1.0.conv1", "layer2.0.conv1"]
    ckpt = tmp_path / "run.json"
    carfast.prune(resnet20, layers, (x, y), keep={"layer1.0.conv1": 15, "layer2.0.conv1": 31}, checkpoint=ckpt,
                  progress=False)
    more = carfast.prune(resnet20, layers, (x, y), keep={"layer1.0.conv1": 13, "layer2.0.conv1": 30},
                         checkpoint=ckpt, progress=False)
    fresh = carfast.prune(resnet20, layers, (x, y), keep={"layer1.0.conv1": 13, "layer2.0.conv1": 30},
                          progress=False)
    assert more.removed == fresh.removed and [r["correct"] for r in more.history] == \
        [r["correct"] for r in fresh.history]
    assert json.loads(ckpt.read_text())["settings"]["keep"] == {"layer1.0.conv1": 13, "layer2.0.conv1": 30}


def test_finetune_callable_and_model_untouched(resnet20):
    x, y = cifar10_test(40)
    before = _state(resnet20)
    seen = []

    def tune(model):
        seen.append(model.layer1[0].conv1.out_channels)
        return model

    result = carfast.prune(resnet20, "layer1.0.conv1", (x, y), keep=15, finetune=tune, progress=False)
    assert seen == [15] and result.finetuned_accuracy is not None
    assert _same_state(before, resnet20.state_dict())


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(layers="layer1.0.conv1", keep=17), ValueError, "keep=17.*impossible.*16 filters"),
    (dict(layers="layer1.0.conv1", keep=0), ValueError, "keep=0"),
    (dict(layers="layer1.0.conv1", keep=1.5), ValueError, "fraction"),
    (dict(layers="layer1.0.conv1", keep="8"), TypeError, "keep"),
    (dict(layers="layer1.0.cnv1", keep=8), ValueError, "did you mean 'layer1.0.conv1'"),
    (dict(layers="linear", keep=8), ValueError, "produces the model's outputs"),
    (dict(layers=["conv1", "layer1.2.conv2"], keep=8), ValueError, "one coupling group"),
    (dict(layers=["layer1.0.conv1", "layer1.0.conv1"], keep=8), ValueError, "more than once"),
    (dict(layers="layer1.0.conv1", keep={"layer2.0.conv1": 8}), ValueError, "missing"),
    (dict(layers="layer1.0.conv1", keep=8, step=0), ValueError, "step"),
    (dict(layers="layer1.0.conv1", keep=8, schedule="parallel"), ValueError, "schedule"),
    (dict(layers="layer1.0.conv1", keep=8, criterion="l2"), ValueError, "l1"),
    (dict(layers="layer1.0.conv1", keep=8, max_accuracy_drop=2), ValueError, "max_accuracy_drop"),
    (dict(layers="layer1.0.conv1", keep=8, batchsize=8), TypeError, "batchsize"),
    (dict(layers="layer1.0.conv1", keep=8, finetune={"epochs": 1}), ValueError, "'data'"),
])
def test_bad_arguments(resnet20, kwargs, err, match):
    x, y = cifar10_test(20)
    before = _state(resnet20)
    with pytest.raises(err, match=match):
        carfast.prune(resnet20, data=(x, y), progress=False, **kwargs)
    assert _same_state(before, resnet20.state_dict())


def test_one_shot_iterator_is_refused(resnet20):
    x, y = cifar10_test(20)
    with pytest.raises(ValueError, match="one-shot iterator"):
        carfast.prune(resnet20, "layer1.0.conv1", iter([(x, y)]), keep=8)
