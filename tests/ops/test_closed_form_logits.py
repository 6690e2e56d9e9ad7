"""The CPU kernel of closed_form_logits (csrc/cpu/closed_form_logits.cpp) against the reference.

The kernel tests skip, with the reason, when the C++ extension is not built; with
CARFAST_REQUIRE_EXT=1 (set by CI, tools/test.sh) a missing extension is a failure instead.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from compare import assert_close_verbose

from carfast import extensions
from carfast.ops.closed_form_logits import ACTIVATIONS, closed_form_logits, closed_form_logits_ref

_CPU_OK = extensions.has_backend("cpu")
_CPU_WHY = next(b["reason"] for b in extensions.backends() if b["name"] == "cpu")
needs_cpu = pytest.mark.skipif(not _CPU_OK, reason=f"C++ extension not built: {_CPU_WHY}")


def test_extension_present_when_required():
    """CI sets CARFAST_REQUIRE_EXT=1 so that a broken build cannot pass as skipped tests."""
    if os.environ.get("CARFAST_REQUIRE_EXT") != "1":
        pytest.skip("CARFAST_REQUIRE_EXT is not 1: a missing extension only skips the kernel tests")
    if not _CPU_OK:
        pytest.fail(f"CARFAST_REQUIRE_EXT=1 but the cpu backend (carfast._C) is unavailable: {_CPU_WHY}")


def make_case(N=3, K=4, O=5, H=6, W=6, kernel=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), C=7,
              residual=True, act=1, zeros=0.5, filters=None, seed=0):
    """Inputs of closed_form_logits as a dict; z is the real conv output plus a bias, so E sees both
    signs (and values above 6) and ``a`` has a fraction ``zeros`` of exact zeros."""
    g = torch.Generator().manual_seed(seed)
    kh, kw = kernel
    a = torch.randn(N, K, H, W, generator=g)
    a = torch.where(torch.rand(N, K, H, W, generator=g) < zeros, torch.zeros(()), a)
    weight = torch.randn(O, K, kh, kw, generator=g) / math.sqrt(K * kh * kw)
    z = 3 * F.conv2d(a, weight, torch.randn(O, generator=g), stride, padding, dilation)
    Ho, Wo = z.shape[2:]
    return dict(
        a=a, weight=weight, z=z,
        scale=torch.rand(O, generator=g) + 0.5,
        shift=2 * torch.randn(O, generator=g),
        residual=2 * torch.randn(N, O, Ho, Wo, generator=g) if residual else None,
        act=act,
        tail=torch.randn(C, O, Ho, Wo, generator=g) / math.sqrt(O * Ho * Wo),
        logits=torch.randn(N, C, generator=g),
        filters=torch.arange(K) if filters is None else torch.tensor(filters, dtype=torch.int64),
        stride=stride, padding=padding, dilation=dilation,
    )


def run_cpu(c):
    return torch.ops.carfast.closed_form_logits(c["a"], c["weight"], c["z"], c["scale"], c["shift"], c["residual"],
                                                c["act"], c["tail"], c["logits"], c["filters"], list(c["stride"]),
                                                list(c["padding"]), list(c["dilation"]))


def run_ref(c):
    return closed_form_logits_ref(**c)


def check(c, what=""):
    out, ref = run_cpu(c), run_ref(c)
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    assert_close_verbose(out, ref, atol=1e-5 * scale, rtol=1e-5, what=what)
    return out, ref


SHAPES = {
    "base": {},
    "K1": dict(K=1),
    "O1": dict(O=1),
    "O17_C11": dict(O=17, C=11),               # O not a multiple of the SIMD width; odd class chunks
    "O70_C1": dict(K=3, O=70, C=1),
    "odd_7x5": dict(H=7, W=5),
    "k1x1": dict(kernel=(1, 1), padding=(0, 0)),
    "k5x5_pad2": dict(kernel=(5, 5), padding=(2, 2), H=7, W=7),
    "stride2": dict(H=7, W=5, stride=(2, 2)),
    "stride2_k1x1": dict(H=7, W=6, kernel=(1, 1), padding=(0, 0), stride=(2, 2)),
    "pad0": dict(padding=(0, 0), H=7, W=5),
    "dilation2": dict(dilation=(2, 2), padding=(2, 2), H=7, W=6),
    "rect_mixed": dict(H=7, W=9, kernel=(1, 3), stride=(1, 2), padding=(0, 2), dilation=(1, 2)),
    "J1": dict(K=5, filters=[3]),
    "J5_of_6": dict(K=6, filters=[0, 1, 2, 3, 4]),   # a partial block of filters
    "filters_repeat_unordered": dict(filters=[3, 0, 3, 1, 2, 0]),
    "N1": dict(N=1),
    "dense": dict(zeros=0.0),
    "sparse": dict(zeros=0.95, N=6),
    "wide_W70": dict(N=2, K=3, O=3, H=3, W=70, C=3),                # padded rows wider than 64
    "wide_W63_pad1": dict(N=2, K=3, O=3, H=3, W=63, C=3, stride=(1, 2)),  # exactly 64 wide
}


@needs_cpu
@pytest.mark.parametrize("name", list(SHAPES))
def test_matches_reference_shapes(name):
    check(make_case(**SHAPES[name]), what=name)


@needs_cpu
@pytest.mark.parametrize("act", sorted(ACTIVATIONS.values()))
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no_residual"])
@pytest.mark.parametrize("shape", ["base", "stride2"])
def test_matches_reference_epilogues(act, residual, shape):
    check(make_case(act=act, residual=residual, **SHAPES[shape]), what=f"act={act} residual={residual} {shape}")


@needs_cpu
def test_relu6_saturates_both_ways():
    """relu6 cases where z and z - delta fall on different sides of 0 and 6 actually occur here."""
    c = make_case(act=2, N=4, K=4, O=8, H=6, W=6)
    pre = c["z"] * c["scale"].view(1, -1, 1, 1) + c["shift"].view(1, -1, 1, 1) + c["residual"]
    assert (pre > 6).any() and (pre < 0).any()
    check(c)


@needs_cpu
def test_all_zero_channel_is_exactly_the_logits():
    c = make_case(N=4, K=5, zeros=0.3)
    c["a"][:, 1] = 0           # channel 1 zero in every image
    c["a"][2, 3] = 0           # channel 3 zero in image 2 only
    out, ref = check(c)
    assert torch.equal(out[1], c["logits"])
    assert torch.equal(out[3, 2], c["logits"][2])
    assert not torch.equal(out[0], c["logits"])


@needs_cpu
def test_pixels_off_the_stride_grid_are_exactly_the_logits():
    """1x1 kernel, stride 2, no padding: pixels at odd rows or columns reach no output."""
    c = make_case(N=2, K=3, H=6, W=6, kernel=(1, 1), padding=(0, 0), stride=(2, 2))
    c["a"][:, 0] = 0
    c["a"][:, 0, 1::2, :] = 1.0
    out, _ = check(c)
    assert torch.equal(out[0], c["logits"])


@needs_cpu
def test_empty_filters_and_zero_images():
    c = make_case(filters=[])
    out = run_cpu(c)
    assert out.shape == (0, 3, 7) and out.dtype == torch.float32
    c = make_case(N=0)
    assert run_cpu(c).shape == (4, 0, 7)


@needs_cpu
def test_non_contiguous_inputs():
    c = make_case(N=3, K=4, O=6, H=6, W=6)
    expected = run_ref(c)
    c["a"] = c["a"].transpose(2, 3).contiguous().transpose(2, 3)
    c["weight"] = c["weight"].permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)
    c["z"] = c["z"].contiguous(memory_format=torch.channels_last)
    c["tail"] = c["tail"].transpose(0, 1).contiguous().transpose(0, 1)
    c["logits"] = c["logits"].t().contiguous().t()
    c["filters"] = torch.arange(4).repeat_interleave(2)[::2]   # [0, 1, 2, 3], strided
    assert not (c["a"].is_contiguous() or c["weight"].is_contiguous() or c["filters"].is_contiguous())
    assert_close_verbose(run_cpu(c), expected, atol=1e-5 * max(1.0, expected.abs().max().item()), rtol=1e-5)


@needs_cpu
def test_same_result_on_any_thread_count():
    c = make_case(N=9, K=6, O=16, H=5, W=5)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_cpu(c)
        torch.set_num_threads(2)
        two = run_cpu(c)
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(one, two)


@needs_cpu
def test_public_function_backends():
    c = make_case()
    args = dict(c)
    got = closed_form_logits(**args, backend="cpu")
    assert torch.equal(got, run_cpu(c))
    assert torch.equal(closed_form_logits(**args, backend="torch"), run_ref(c))
    args["filters"] = [0, 2]                     # a list, and int conv settings, are accepted
    args.update(stride=1, padding=1, dilation=1)
    assert torch.equal(closed_form_logits(**args, backend="cpu"), got[[0, 2]])
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        closed_form_logits(**c, backend="nope")


@needs_cpu
@pytest.mark.parametrize("change, pattern", [
    (lambda c: c.update(a=c["a"].double()),
     r"closed_form_logits: `a` must be float32, got Double; fix: pass `a.float\(\)`"),
    (lambda c: c.update(filters=c["filters"].int()), r"`filters` must be int64"),
    (lambda c: c.update(filters=torch.tensor([0, 4])), r"`filters\[1\]` must be an input channel in \[0, 4\), got 4"),
    (lambda c: c.update(filters=torch.tensor([-1])), r"`filters\[0\]` must be an input channel"),
    (lambda c: c.update(z=c["z"][:, :, :-1]),
     r"`z` must have shape \[N, O, Ho, Wo\] = \[3, 5, 6, 6\], got \[3, 5, 5, 6\]"),
    (lambda c: c.update(residual=c["residual"][:1]), r"`residual` must have shape"),
    (lambda c: c.update(tail=c["tail"][:3]), r"`tail` must have shape \[classes, O, Ho, Wo\]"),
    (lambda c: c.update(logits=c["logits"][:, :2]), r"`tail` must have shape|`logits` must have shape"),
    (lambda c: c.update(scale=c["scale"][:2]), r"`scale` must have shape \[O\]"),
    (lambda c: c.update(weight=c["weight"][:, :2]), r"`weight` must be \[O, K, kh, kw\] with K = a.size\(1\) = 4"),
    (lambda c: c.update(a=c["a"][0]), r"`a` must be 4-D \[N, K, H, W\], got shape \[4, 6, 6\]"),
    (lambda c: c.update(act=3), r"`act` must be 0 \(identity\), 1 \(relu\) or 2 \(relu6\), got 3"),
    (lambda c: c.update(stride=(0, 1)), r"`stride` must be >= 1"),
    (lambda c: c.update(stride=(1, 1, 1)), r"`stride` must list 2 ints"),
    (lambda c: c.update(padding=(0, 0), weight=torch.randn(5, 4, 7, 7)), r"does not fit the input"),
])
def test_bad_input_names_the_argument(change, pattern):
    c = make_case()
    change(c)
    with pytest.raises(RuntimeError, match=pattern) as info:
        run_cpu(c)
    assert "carfast::closed_form_logits" in str(info.value) and "fix:" in str(info.value)


@needs_cpu
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no_residual"])
def test_opcheck(residual):
    c = make_case(N=2, K=3, O=4, H=5, W=5, C=3, residual=residual)
    args = (c["a"], c["weight"], c["z"], c["scale"], c["shift"], c["residual"], c["act"], c["tail"], c["logits"],
            c["filters"], [1, 1], [1, 1], [1, 1])
    torch.library.opcheck(torch.ops.carfast.closed_form_logits.default, args)


def test_disabled_extension_reports_why():
    """CARFAST_DISABLE_EXT=1: the pure-PyTorch path, and a cpu request that says why it cannot run."""
    code = (
        "import carfast.extensions as e, torch\n"
        "from carfast.ops.closed_form_logits import closed_form_logits\n"
        "b = {x['name']: x for x in e.backends()}\n"
        "assert b['torch']['available'] and not b['cpu']['available'], b\n"
        "assert 'CARFAST_DISABLE_EXT=1' in b['cpu']['reason'], b['cpu']\n"
        "assert set(b) == {'torch', 'cpu', 'triton', 'cuda'} and not b['triton']['available']\n"
        "try:\n"
        "    e.require_backend('cpu')\n"
        "except RuntimeError as exc:\n"
        "    assert 'CARFAST_DISABLE_EXT=1' in str(exc), exc\n"
        "else:\n"
        "    raise AssertionError('require_backend did not raise')\n"
        "print('ok')\n"
    )
    env = dict(os.environ, CARFAST_DISABLE_EXT="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout + res.stderr
