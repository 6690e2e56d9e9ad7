"""Top-k accuracy (``topk=``): the reduction, every scoring method, low precision, evaluate and prune,
against the naive reference (tests/naive.py: a stable sort of each row's logits)."""
from __future__ import annotations

import functools
import json

import pytest
import torch
from naive import naive_scores, near_tie, per_class_counts, topk_correct, topk_margin_of
from nets import NETS, make_data

import carfast
from carfast.ops.score_reduce import pair_results, score_reduce
from carfast.pruning.evaluate import evaluate

N = 300
LAYERS = {"layer1.0.conv1": "layer1.0.conv2",      # suffix method
          "layer3.2.conv1": "layer3.2.conv2"}      # closed form


@functools.lru_cache(maxsize=None)
def _resnet_reference(layer: str):
    model = carfast.models.cifar_resnet(20)
    x, y = carfast.data.cifar10_test(n=N)
    return x, y, naive_scores(model, {LAYERS[layer]: 1}, x, y, range(model.get_submodule(layer).out_channels))


def _assert_topk_matches(res, ref, k: int, what: str):
    """Per image and per class, up to images whose k-th and (k+1)-th naive logits are a near tie."""
    want, base_want = topk_correct(ref.logits, ref.labels, k), topk_correct(ref.base_logits, ref.labels, k)
    ties = near_tie(topk_margin_of(ref.logits, k), ref.logits)
    assert res.topk == k
    assert torch.equal(res.base_image_correct, base_want), f"{what}: intact model's top-{k} differs"
    real = (res.image_correct != want) & ~ties
    assert not real.any(), f"{what}: {int(real.sum())} (filter, image) pairs differ from the naive top-{k}"
    assert torch.equal(res.correct, per_class_counts(res.image_correct, ref.labels, ref.num_classes))
    assert res.base_correct.tolist() == per_class_counts(base_want[None], ref.labels, ref.num_classes)[0].tolist()
    assert torch.allclose(res.loss_sum, ref.loss.sum(1), rtol=1e-5)   # the loss does not depend on k


def test_pair_results_top_k_equals_a_stable_sort():
    g = torch.Generator().manual_seed(0)
    logits = torch.randint(-3, 4, (500, 7), generator=g).float()     # many exact ties
    labels = torch.randint(0, 7, (500,), generator=g)
    for k in (1, 2, 3, 6):
        correct, loss = pair_results(logits, labels, k)
        assert torch.equal(correct, topk_correct(logits, labels, k)), k
        assert torch.equal(loss, pair_results(logits, labels)[1])
    assert torch.equal(pair_results(logits, labels, 1)[0], logits.argmax(1) == labels)


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton", "cuda"])
def test_score_reduce_top_k_on_every_backend_equals_the_reference(backend):
    """The compiled kernels count top-1; top-k runs the reference whichever backend is asked for."""
    g = torch.Generator().manual_seed(1)
    logits, labels = torch.randn(64, 10, generator=g), torch.randint(0, 10, (64,), generator=g)
    slots = torch.arange(4).repeat_interleave(16)
    counts, loss, correct = score_reduce(logits, labels, slots, 4, backend=backend, topk=3)
    want = topk_correct(logits, labels, 3)
    assert torch.equal(correct, want)
    assert counts.sum(1).tolist() == [int(want[s * 16:(s + 1) * 16].sum()) for s in range(4)]


@pytest.mark.parametrize("layer", sorted(LAYERS))
@pytest.mark.parametrize("k", [3, 5])
def test_score_layer_top_k_equals_naive(layer, k, one_thread):
    x, y, ref = _resnet_reference(layer)
    res = carfast.score_layer(carfast.models.cifar_resnet(20), layer, (x, y), topk=k, per_image=True, progress=False)
    assert res.method == ("suffix" if layer == "layer1.0.conv1" else "closed_form")
    _assert_topk_matches(res, ref, k, f"{layer} top-{k} ({res.method})")
    top1 = carfast.score_layer(carfast.models.cifar_resnet(20), layer, (x, y), progress=False)
    assert bool((res.accuracy >= top1.accuracy).all()) and res.base_accuracy >= top1.base_accuracy


def test_full_network_method_top_k_equals_naive():
    case = NETS["untraceable"]()
    x, y = make_data(case, 120)
    ref = naive_scores(case.model, case.consumers, x, y, range(case.model.get_submodule(case.layer).out_channels))
    res = carfast.score_layer(case.model, case.layer, (x, y), topk=2, per_image=True, progress=False)
    assert res.method == "full_network"
    _assert_topk_matches(res, ref, 2, "untraceable top-2")


def test_bf16_top_k_equals_fp32_top_k(one_thread):
    """The low-precision re-run uses the k-th / (k+1)-th margin: per image equal to float32."""
    x, y, _ = _resnet_reference("layer1.0.conv1")
    model = carfast.models.cifar_resnet(20)
    fp32 = carfast.score_layer(model, "layer1.0.conv1", (x, y), topk=3, per_image=True, progress=False)
    bf16 = carfast.score_layer(model, "layer1.0.conv1", (x, y), topk=3, per_image=True, precision="bf16",
                               progress=False)
    assert torch.equal(bf16.image_correct, fp32.image_correct)
    assert bf16.pairs_rechecked > 0


def test_evaluate_and_prune_count_top_k():
    x, y = carfast.data.cifar10_test(n=200)
    model = carfast.models.cifar_resnet(20)
    with torch.no_grad():
        logits = model.eval()(x)
    assert evaluate(model, (x, y), topk=5).correct == int(topk_correct(logits, y, 5).sum())
    res = carfast.prune(model, "layer3.2.conv1", (x, y), keep=60, topk=5, progress=False)
    assert res.base["accuracy"] == evaluate(model, (x, y), topk=5).accuracy
    assert res.accuracy == evaluate(res.model, (x, y), topk=5).accuracy
    assert res.settings["topk"] == 5 and "top-5 %" in str(res.summary())
    assert "topk" not in carfast.prune(model, "layer3.2.conv1", (x, y), keep=63, progress=False).settings


@pytest.mark.parametrize("topk, match", [(0, "topk must be an int >= 1"), (2.0, "topk must be an int"),
                                         (10, "pass topk < 10")])
def test_bad_topk_is_refused_and_changes_nothing(topk, match):
    x, y = carfast.data.cifar10_test(n=16)
    model = carfast.models.cifar_resnet(20)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        carfast.score_layer(model, "layer3.2.conv1", (x, y), topk=topk, progress=False)
    with pytest.raises(ValueError, match=match):
        evaluate(model, (x, y), topk=topk)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_the_command_counts_top_k(tmp_path, capsys):
    from carfast.cli import main
    out = tmp_path / "s.json"
    assert main(["score", "--layer", "layer3.2.conv1", "--n", "40", "--topk", "3", "--json", str(out)]) == 0
    assert "base top-3 accuracy" in capsys.readouterr().out
    d = json.loads(out.read_text())["layers"][0]
    x, y = carfast.data.cifar10_test(n=40)
    assert d["topk"] == 3 and d["base_accuracy"] == evaluate(carfast.models.cifar_resnet(20), (x, y), topk=3).accuracy
    pruned = tmp_path / "p.pt"
    assert main(["prune", "--model", "resnet20", "--layer", "layer3.2.conv1", "--n", "40", "--keep", "62",
                 "--topk", "3", "--out", str(pruned)]) == 0
    assert "top-3 %" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["score", "--layer", "layer3.2.conv1", "--n", "40", "--topk", "0"])
    assert "--topk: '0' is not a positive integer" in capsys.readouterr().err


def test_the_closed_forms_top_k_path_works_a_slice_of_filters_at_a_time(monkeypatch):
    """The unfused closed form materialises ablated logits: in slices, with the same results."""
    from carfast.scoring import closed_form_method
    x, y, ref = _resnet_reference("layer3.2.conv1")
    monkeypatch.setattr(closed_form_method, "_SLICE_ELEMENTS", 7 * N * 10)     # 7 filters per slice
    res = carfast.score_layer(carfast.models.cifar_resnet(20), "layer3.2.conv1", (x, y), topk=2, per_image=True,
                              progress=False)
    _assert_topk_matches(res, ref, 2, "layer3.2.conv1 top-2 in slices of 7 filters")
