"""precision="bf16"/"fp16": the suffix in low precision with an exact float32 re-run of small-margin pairs.

The accuracy counts must equal float32's exactly; without the re-run they do not (the test shows the
fallback is needed); the threshold's derivation is checked on its own.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from nets import NETS, SCORABLE, make_data

import carfast
from carfast import data, models
from carfast.scoring import suffix_eval, suffix_opt
from carfast.scoring.precision import check_precision, margin_threshold, top1_margin


@pytest.fixture(scope="module")
def resnet20_data():
    x, y = data.cifar10_test(600)
    return models.cifar_resnet(20), (x, y)


def _score(model, layer, d, filters=None, **kw):
    opts = kw.pop("options", None)
    scorer = carfast.LayerScorer(model, layer, d, progress=False, options=opts, **kw)
    return scorer.score(None if filters is None else list(filters), per_image=True)


def test_bf16_counts_equal_fp32_on_resnet20(resnet20_data):
    model, d = resnet20_data
    ref = _score(model, "layer1.0.conv1", d)
    low = _score(model, "layer1.0.conv1", d, precision="bf16")
    assert low.method == "suffix" and low.precision == "bf16" and ref.precision == "fp32"
    assert 0 < low.pairs_rechecked < low.pairs_evaluated
    assert low.margin_threshold > 0
    assert torch.equal(low.correct, ref.correct)
    assert torch.equal(low.image_correct, ref.image_correct)
    assert torch.allclose(low.loss_sum, ref.loss_sum, rtol=2e-2)


def test_without_the_rerun_bf16_differs(resnet20_data, monkeypatch):
    """The same scoring with the re-run disabled flips some pairs: the fallback is what makes it exact."""
    model, d = resnet20_data
    ref = _score(model, "layer1.0.conv1", d)
    monkeypatch.setattr(suffix_eval, "topk_margin", lambda logits, k: torch.full((logits.shape[0],), float("inf")))
    low = _score(model, "layer1.0.conv1", d, precision="bf16")
    assert low.pairs_rechecked == 0
    assert not torch.equal(low.image_correct, ref.image_correct)


def test_fused_consumer_path_equals_plain_suffix(resnet20_data):
    """ScoreOptions(fused_consumer=True): the ablated_consumer op + the network after the epilogue."""
    model, (x, y) = resnet20_data
    d = (x[:150], y[:150])
    fused_opt = carfast.ScoreOptions(fused_consumer=True)
    refs = {}
    for layer in ("layer1.0.conv1", "layer2.1.conv1"):
        refs[layer] = ref = _score(model, layer, d, filters=range(8))
        fused = _score(model, layer, d, filters=range(8), options=fused_opt)
        assert torch.equal(fused.image_correct, ref.image_correct), layer
        assert torch.allclose(fused.loss_sum, ref.loss_sum, rtol=1e-5)
    low = _score(model, "layer1.0.conv1", d, filters=range(8), precision="bf16", options=fused_opt)
    assert low.pairs_rechecked > 0
    assert torch.equal(low.image_correct, refs["layer1.0.conv1"].image_correct)


@pytest.mark.parametrize("emulated", [False, True])
@pytest.mark.parametrize("net", [n for n in SCORABLE if n != "untraceable"])
def test_fp16_and_fused_on_synthetic_nets(net, emulated, monkeypatch):
    """Counts equal float32's on every net, with this CPU's own convolutions and with the float32
    emulation of CPUs without native bf16 / fp16 (forced: ``emulated``)."""
    if emulated:
        monkeypatch.setattr(suffix_opt, "onednn_supports", lambda dtype: dtype == torch.float32)
    case = NETS[net]()
    model, layer = case.model, case.layer
    x, y = make_data(case, 48)
    ref = _score(model, layer, (x, y))
    for prec in ("fp16", "bf16"):
        for fused in (False, True):
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "score_layer: this CPU has no native")
                r = _score(model, layer, (x, y), precision=prec, options=carfast.ScoreOptions(fused_consumer=fused))
            assert torch.equal(r.image_correct, ref.image_correct), (net, prec, fused)


def test_threshold_derivation():
    exact = torch.tensor([[3.0, 1.0, 0.0], [2.0, 1.9, -1.0]])
    low = exact + torch.tensor([[0.05, -0.05, 0.0], [0.0, 0.1, 0.0]])
    thr = margin_threshold(low, exact)
    assert thr == pytest.approx(2 * 4.0 * 0.1)
    m = top1_margin(low)
    assert m.tolist() == pytest.approx([2.1, 0.0], abs=1e-6)
    assert margin_threshold(exact, exact) > 0          # ties are always re-run
    assert top1_margin(torch.zeros(4, 1)).isinf().all()


def test_precision_is_checked(resnet20_data):
    model, d = resnet20_data
    with pytest.raises(ValueError, match="precision 'half' unknown; choose one of fp32, bf16, fp16"):
        carfast.score_layer(model, "layer1.0.conv1", d, precision="half")
    assert check_precision("bf16", "x") == torch.bfloat16


def test_closed_form_ignores_precision_and_says_so(resnet20_data):
    model, d = resnet20_data
    r = _score(model, "layer3.2.conv1", d, precision="bf16")
    assert r.method == "closed_form" and r.precision == "fp32" and r.pairs_rechecked == 0
    assert carfast.LayerScores.from_dict(r.to_dict()).precision == "fp32"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("onednn", [True, False])
def test_fused_conv_ops_on_cpus_with_and_without_onednn_support(dtype, onednn, monkeypatch):
    """conv_relu / conv_add_relu take oneDNN's fused kernel only where this CPU's oneDNN runs the dtype
    (fp16 needs AVX-512-FP16 / AVX-NE-CONVERT, which e.g. AMD Zen 5 lacks) and plain PyTorch otherwise;
    both give relu(conv(x) [+ other]) on every CPU. onednn=False forces the plain path; onednn=True
    takes whatever this CPU supports (skipped where oneDNN cannot run the dtype here)."""
    if onednn and not suffix_opt.onednn_supports(dtype):
        pytest.skip(f"this CPU's oneDNN does not run {dtype} convolutions")
    if not onednn:
        monkeypatch.setattr(suffix_opt, "onednn_supports", lambda _dtype: False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 9, 7, generator=g)
    w, b = torch.randn(6, 5, 3, 3, generator=g), torch.randn(6, generator=g)
    other = torch.randn(2, 6, 5, 3, generator=g)
    args = ([1, 0], [2, 2], [1, 1], 1)     # padding, stride, dilation, groups (the oneDNN op's order)
    pre = torch.nn.functional.conv2d(x.double(), w.double(), b.double(), 2, (1, 0))
    ref = torch.relu(pre)
    cl = torch.channels_last
    lo = [t.to(dtype).contiguous(memory_format=cl) if t.dim() == 4 else t.to(dtype) for t in (x, w, b, other)]
    got = suffix_opt.conv_relu(lo[0], lo[1], lo[2], *args)
    got_add = suffix_opt.conv_add_relu(lo[0], lo[3], lo[1], lo[2], *args)
    got_plain = suffix_opt.conv2d(lo[0], lo[1], lo[2], *args)
    tol = {torch.float32: 1e-5, torch.bfloat16: 5e-2, torch.float16: 5e-3}[dtype]
    assert got.dtype == dtype and got_add.dtype == dtype and got_plain.dtype == dtype
    assert torch.allclose(got.double(), ref, rtol=tol, atol=tol * ref.abs().max())
    assert torch.allclose(got_plain.double(), pre, rtol=tol, atol=tol * pre.abs().max())
    ref_add = torch.relu(pre + other.to(dtype).double())
    assert torch.allclose(got_add.double(), ref_add, rtol=tol, atol=tol * ref_add.abs().max())


def test_emulated_low_precision_rounds_float32_arithmetic_once(monkeypatch):
    """Without native bf16 / fp16 (forced), each convolution is float32 arithmetic on the low-precision
    operands rounded once to their dtype, so it differs from the float32 result by at most half an ulp
    of the dtype (and by more than float32 rounding: it is not float32 in disguise)."""
    monkeypatch.setattr(suffix_opt, "onednn_supports", lambda dtype: dtype == torch.float32)
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(3, 8, 10, 10, generator=g), torch.randn(4, 8, 3, 3, generator=g)
    args = ([1, 1], [1, 1], [1, 1], 1)
    for dtype, ulp in ((torch.bfloat16, 2.0 ** -7), (torch.float16, 2.0 ** -10)):
        xl, wl = x.to(dtype), w.to(dtype)
        assert suffix_opt.emulates_low_precision(xl.dtype, xl.device) and \
            not suffix_opt.emulates_low_precision(x.dtype, x.device)
        exact = torch.nn.functional.conv2d(xl.double(), wl.double(), None, 1, 1)
        got = suffix_opt.conv2d(xl, wl, None, *args).double()
        rel = ((got - exact).abs() / exact.abs().clamp_min(1e-3)).max().item()
        assert 1e-5 < rel <= ulp / 2 * 1.01, (dtype, rel)


def test_conv_ops_leave_non_cpu_tensors_to_pytorch(monkeypatch):
    """oneDNN's kernels take CPU tensors only: with tensors elsewhere (the suffix on a GPU; here "meta")
    the ops are plain PyTorch whatever the host CPU supports."""
    monkeypatch.setattr(suffix_opt, "onednn_supports", lambda dtype: True)

    def cpu_only(*args):
        raise AssertionError("oneDNN's kernel called with non-CPU tensors")

    monkeypatch.setattr(suffix_opt.onednn, "conv_relu", cpu_only)
    monkeypatch.setattr(suffix_opt.onednn, "conv_add_relu", cpu_only)
    x, w, other = (torch.empty(2, 4, 6, 6, device="meta"), torch.empty(5, 4, 3, 3, device="meta"),
                   torch.empty(2, 5, 6, 6, device="meta"))
    args = ([1, 1], [1, 1], [1, 1], 1)
    for dtype in (torch.float32, torch.bfloat16):
        xd, wd, od = x.to(dtype), w.to(dtype), other.to(dtype)
        assert not suffix_opt.emulates_low_precision(xd.dtype, xd.device)
        for out in (suffix_opt.conv_relu(xd, wd, None, *args), suffix_opt.conv_add_relu(xd, od, wd, None, *args),
                    suffix_opt.conv2d(xd, wd, None, *args)):
            assert out.device.type == "meta" and out.shape == (2, 5, 6, 6) and out.dtype == dtype


def test_low_precision_warns_where_the_cpu_has_no_native_convolutions(monkeypatch):
    """precision="bf16" on a CPU without native bf16 convolutions (forced) warns that it is emulated and
    names the fix; with them (forced, on the plain suffix) or in float32 it does not."""
    case = NETS["mobilenet_chain"]()
    d = make_data(case, 24)
    monkeypatch.setattr(suffix_opt, "onednn_supports", lambda dtype: dtype == torch.float32)
    for prec in ("bf16", "fp16"):
        with pytest.warns(UserWarning, match=f"score_layer: this CPU has no native {prec} convolutions.*"
                                             "use precision='fp32' on this CPU"):
            _score(case.model, case.layer, d, precision=prec)
    monkeypatch.setattr(suffix_opt, "onednn_supports", lambda dtype: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _score(case.model, case.layer, d, precision="bf16", options=carfast.ScoreOptions(fold_bn=False))
        _score(case.model, case.layer, d)


def test_fp16_scores_exact_without_onednn_fp16(resnet20_data, monkeypatch):
    """The CPU path without oneDNN fp16 (forced here): fp16 counts still equal float32's."""
    monkeypatch.setattr(suffix_opt, "onednn_supports", lambda dtype: dtype == torch.float32)
    model, (x, y) = resnet20_data
    d = (x[:200], y[:200])
    ref = _score(model, "layer2.1.conv1", d, filters=range(6))
    low = _score(model, "layer2.1.conv1", d, filters=range(6), precision="fp16")
    assert low.precision == "fp16" and torch.equal(low.image_correct, ref.image_correct)


@pytest.mark.parametrize("rule", ["accuracy", "lcb"])
def test_greedy_in_bf16_makes_float32s_removals(rule, monkeypatch):
    """Counting rules stay exact in bf16: ties in count are settled by float32 loss sums of the tied."""
    x, y = data.cifar10_test(200)
    model = models.cifar_resnet(20)
    calls = []
    real = carfast.LayerScorer.score

    def spy(self, filters=None, per_image=False, float32=False, **kw):
        calls.append(float32)
        return real(self, filters, per_image, float32, **kw)

    monkeypatch.setattr(carfast.LayerScorer, "score", spy)
    kw = dict(keep=11, rule=rule, progress=False)
    ref = carfast.prune(model, "layer1.0.conv1", (x, y), **kw)
    low = carfast.prune(model, "layer1.0.conv1", (x, y), precision="bf16", **kw)
    assert [r["filter"] for r in low.history] == [r["filter"] for r in ref.history]
    assert [r["correct"] for r in low.history] == [r["correct"] for r in ref.history]
    assert any(calls), "no tie was settled in float32: the test does not exercise the settling"


def test_the_loss_rule_refuses_low_precision():
    x, y = data.cifar10_test(50)
    model = models.cifar_resnet(20)
    with pytest.raises(ValueError, match="the 'loss' rule ranks by summed losses.*precision='fp32'"):
        carfast.prune(model, "layer1.0.conv1", (x, y), keep=8, precision="bf16", progress=False)
    with pytest.raises(ValueError, match="the 'loss' rule"):
        carfast.prune(model, "layer1.0.conv1", (x, y), keep=8, rule="loss", precision="fp16", progress=False)
    carfast.prune(model, "layer3.2.conv1", (x, y), keep=63, criterion="l1", precision="bf16", progress=False)
