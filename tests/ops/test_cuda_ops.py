"""The CUDA kernels (carfast._C_cuda, csrc/cuda/) against the plain-PyTorch references, on a GPU.

Ops: ablated_consumer, closed_form_logits, closed_form_score and score_reduce, registered for the CUDA
dispatch key, so ``torch.ops.carfast.<op>`` on CUDA tensors runs them. The references run on the CPU
in float32 (on the GPU, cuDNN's convolutions may use TF32). The whole file skips, with the reason,
where there is no CUDA device or carfast._C_cuda is not loaded; CARFAST_REQUIRE_CUDA=1 (for the GPU
machine's check script) makes that a failure instead.
"""
from __future__ import annotations

import math
import os

import pytest
import torch
from compare import assert_close_verbose
from test_closed_form_logits import SHAPES, make_case

from carfast import extensions
from carfast.ops.ablated_consumer import ablated_consumer, ablated_consumer_ref
from carfast.ops.closed_form_logits import closed_form_logits_ref
from carfast.ops.closed_form_score import closed_form_score, closed_form_score_ref
from carfast.ops.score_reduce import score_reduce, score_reduce_ref

_CUDA_OK = extensions.has_backend("cuda")
_CUDA_WHY = "" if _CUDA_OK else next(b["reason"] for b in extensions.backends() if b["name"] == "cuda")


def test_cuda_backend_present_when_required():
    """CARFAST_REQUIRE_CUDA=1 (the GPU check script sets it): a missing CUDA backend fails, not skips."""
    if os.environ.get("CARFAST_REQUIRE_CUDA") != "1":
        pytest.skip("CARFAST_REQUIRE_CUDA is not 1: without a GPU or carfast._C_cuda the CUDA tests only skip")
    assert _CUDA_OK, f"CARFAST_REQUIRE_CUDA=1 but the cuda backend is unavailable: {_CUDA_WHY}"


needs_cuda = pytest.mark.skipif(not _CUDA_OK, reason=f"CUDA backend unavailable: {_CUDA_WHY}")
DEV = "cuda"
LOW = [torch.float16, torch.bfloat16]
CONV_KEYS = ("a", "weight", "z", "scale", "shift", "residual")


def to(c: dict, device=None, dtype=None, keys=None) -> dict:
    """A copy of case ``c`` with its tensors (those in ``keys``, default all) moved / cast."""
    out = dict(c)
    for key, v in c.items():
        if isinstance(v, torch.Tensor) and (keys is None or key in keys):
            v = v.to(device) if device is not None else v
            out[key] = v.to(dtype) if dtype is not None and v.is_floating_point() else v
    return out


def tol(ref: torch.Tensor, rel: float = 1e-5) -> float:
    return rel * max(1.0, ref.abs().max().item()) if ref.numel() else rel


# ---------------------------------------------------------------------------------------------
# ablated_consumer

def consumer_case(pairs_seed=0, **shape) -> dict:
    """make_case's consumer, with pairs (filters[p], images[p]): every (filter, image), shuffled."""
    c = make_case(**shape)
    N, K = c["a"].shape[:2]
    ks, ns = torch.meshgrid(c["filters"], torch.arange(N), indexing="ij")
    order = torch.randperm(ks.numel(), generator=torch.Generator().manual_seed(pairs_seed))
    args = {k: c[k] for k in CONV_KEYS + ("act", "stride", "padding", "dilation")}
    args.update(filters=ks.reshape(-1)[order], images=ns.reshape(-1)[order])
    return args


def call_consumer(g: dict, out_dtype=None) -> torch.Tensor:
    return torch.ops.carfast.ablated_consumer(g["a"], g["weight"], g["z"], g["scale"], g["shift"], g["residual"],
                                              g["act"], g["filters"], g["images"], list(g["stride"]),
                                              list(g["padding"]), list(g["dilation"]), out_dtype)


def run_consumer(c: dict, out_dtype=None) -> torch.Tensor:
    return call_consumer(to(c, DEV), out_dtype)


CONSUMER_SHAPES = dict(SHAPES, O40_W33=dict(N=2, K=2, O=40, H=9, W=33, C=2),   # channel and position tiles
                       tall_1col=dict(N=2, K=2, O=3, H=20, W=1, kernel=(3, 1), padding=(1, 0), C=2))


@needs_cuda
@pytest.mark.parametrize("name", list(CONSUMER_SHAPES))
def test_ablated_consumer_shapes(name):
    c = consumer_case(**CONSUMER_SHAPES[name])
    out, ref = run_consumer(c), ablated_consumer_ref(**c)
    assert out.shape == ref.shape and out.stride() == ref.stride() and out.dtype == ref.dtype
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close_verbose(out.cpu(), ref, atol=tol(ref), rtol=1e-5, what=name)


@needs_cuda
@pytest.mark.parametrize("act", [0, 1, 2])
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no_residual"])
@pytest.mark.parametrize("shape", ["base", "stride2", "dilation2"])
def test_ablated_consumer_epilogues(act, residual, shape):
    c = consumer_case(act=act, residual=residual, **SHAPES[shape])
    ref = ablated_consumer_ref(**c)
    assert_close_verbose(run_consumer(c).cpu(), ref, atol=tol(ref), rtol=1e-5, what=f"act={act} {shape}")


@needs_cuda
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("shape", ["O17_C11", "stride2"])
def test_ablated_consumer_low_precision(dtype, shape):
    """Inputs and output in `dtype`: the error against float32 arithmetic on the same inputs is at most
    about twice that of PyTorch's reference in that dtype (both round one float32 result)."""
    c = to(consumer_case(**SHAPES[shape]), dtype=dtype, keys=CONV_KEYS)
    exact = ablated_consumer_ref(**c, out_dtype=torch.float32).double()
    out = run_consumer(c).cpu()
    assert out.dtype == dtype
    err = (out.double() - exact).abs().max().item()
    err_torch = (ablated_consumer_ref(**c).double() - exact).abs().max().item()
    assert err <= 2 * err_torch + 1e-4 * exact.abs().max().item(), (err, err_torch)
    # float32 out of low-precision inputs: the reference's float32 arithmetic
    ref32 = ablated_consumer_ref(**c, out_dtype=torch.float32)
    assert_close_verbose(run_consumer(c, torch.float32).cpu(), ref32, atol=tol(ref32), rtol=1e-5)


@needs_cuda
def test_ablated_consumer_strides_mixed_dtypes_and_out_dtype():
    c = consumer_case(N=3, K=4, O=6, H=6, W=6)
    ref = ablated_consumer_ref(**c)
    s = dict(c)
    s["a"] = c["a"].transpose(2, 3).contiguous().transpose(2, 3)
    s["z"] = c["z"].contiguous(memory_format=torch.channels_last)
    s["residual"] = c["residual"].transpose(0, 1).contiguous().transpose(0, 1)
    s["weight"] = c["weight"].permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)
    s["filters"] = c["filters"].repeat_interleave(2)[::2]
    assert_close_verbose(run_consumer(s).cpu(), ref, atol=tol(ref), rtol=1e-5, what="strided")
    # a in float16, z and residual in float32: read in float32, as the reference computes
    m = dict(c, a=c["a"].half(), weight=c["weight"].half())
    ref_m = ablated_consumer_ref(**m)
    assert_close_verbose(run_consumer(m).cpu(), ref_m, atol=tol(ref_m), rtol=1e-5, what="mixed")
    # an out_dtype the kernel does not write directly (float64): float32, then cast, as the reference
    out64 = run_consumer(c, torch.float64)
    ref64 = ablated_consumer_ref(**c, out_dtype=torch.float64)
    assert out64.dtype == torch.float64 and out64.stride() == ref64.stride()
    assert torch.equal(out64.cpu(), run_consumer(c).cpu().double())


@needs_cuda
def test_ablated_consumer_empty_and_public_function():
    c = consumer_case()
    e = dict(c, filters=c["filters"][:0], images=c["images"][:0])
    assert run_consumer(e).shape == (0,) + tuple(c["z"].shape[1:])
    g = to(c, DEV)
    got = ablated_consumer(**g, backend="cuda")
    assert torch.equal(got, run_consumer(c))


# ---------------------------------------------------------------------------------------------
# closed_form_logits (CUDA kernel shared with closed_form_score)

CF_SHAPES = dict(SHAPES,
                 C25=dict(C=25),                                          # two blocks of 16 classes
                 C100_N40=dict(C=100, N=40, K=3),                         # classes in 7 blocks, 2 tiles
                 N70_sparse=dict(N=70, K=3, zeros=0.9),                   # tiles and groups, partial
                 resnet_layer3=dict(N=64, K=16, O=64, H=8, W=8, C=10),    # full tiles of 32 images
                 big_channel=dict(N=2, K=2, O=3, H=130, W=130, C=5))      # channels read from global memory


def run_logits(c: dict) -> torch.Tensor:
    g = to(c, DEV)
    return torch.ops.carfast.closed_form_logits(g["a"], g["weight"], g["z"], g["scale"], g["shift"], g["residual"],
                                                g["act"], g["tail"], g["logits"], g["filters"], list(g["stride"]),
                                                list(g["padding"]), list(g["dilation"]))


@needs_cuda
@pytest.mark.parametrize("name", list(CF_SHAPES))
def test_closed_form_logits_shapes(name):
    c = make_case(**CF_SHAPES[name])
    out, ref = run_logits(c).cpu(), closed_form_logits_ref(**c)
    assert_close_verbose(out, ref, atol=tol(ref, 2e-5), rtol=1e-5, what=name)
    for j, k in enumerate(c["filters"].tolist()):        # free zeros: exactly the intact logits
        zero = ~c["a"][:, k].flatten(1).ne(0).any(1)
        assert torch.equal(out[j][zero], c["logits"][zero])


@needs_cuda
@pytest.mark.parametrize("act", [0, 1, 2])
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no_residual"])
@pytest.mark.parametrize("shape", ["base", "stride2"])
def test_closed_form_logits_epilogues(act, residual, shape):
    c = make_case(act=act, residual=residual, **SHAPES[shape])
    ref = closed_form_logits_ref(**c)
    assert_close_verbose(run_logits(c).cpu(), ref, atol=tol(ref), rtol=1e-5, what=f"act={act} {shape}")


@needs_cuda
def test_closed_form_logits_zero_channels_and_off_grid_pixels():
    c = make_case(N=4, K=5, zeros=0.3)
    c["a"][:, 1] = 0
    c["a"][2, 3] = 0
    out = run_logits(c).cpu()
    assert torch.equal(out[1], c["logits"]) and torch.equal(out[3, 2], c["logits"][2])
    assert not torch.equal(out[0], c["logits"])
    # 1x1 kernel, stride 2: pixels on odd rows reach no output, so d = 0 exactly
    c = make_case(N=2, K=3, H=6, W=6, kernel=(1, 1), padding=(0, 0), stride=(2, 2))
    c["a"][:, 0] = 0
    c["a"][:, 0, 1::2, :] = 1.0
    assert torch.equal(run_logits(c).cpu()[0], c["logits"])


# ---------------------------------------------------------------------------------------------
# closed_form_score

def run_score(c: dict, labels: torch.Tensor):
    g = to(c, DEV)
    return torch.ops.carfast.closed_form_score(g["a"], g["weight"], g["z"], g["scale"], g["shift"], g["residual"],
                                               g["act"], g["tail"], g["logits"], g["filters"], labels.to(DEV),
                                               list(g["stride"]), list(g["padding"]), list(g["dilation"]))


def labels_for(c: dict, seed: int = 1) -> torch.Tensor:
    N, C = c["logits"].shape
    return torch.randint(0, max(C, 1), (N,), generator=torch.Generator().manual_seed(seed))


@needs_cuda
@pytest.mark.parametrize("name", ["base", "K1", "O1", "O17_C11", "O70_C1", "odd_7x5", "stride2", "dilation2",
                                  "rect_mixed", "J1", "filters_repeat_unordered", "N1", "sparse", "dense", "C25",
                                  "C100_N40", "N70_sparse", "resnet_layer3", "big_channel"])
def test_closed_form_score_matches_reference(name):
    c = make_case(**CF_SHAPES[name])
    labels = labels_for(c)
    counts, loss_sums, correct = (t.cpu() for t in run_score(c, labels))
    J, N, C = len(c["filters"]), c["logits"].shape[0], c["logits"].shape[1]
    assert counts.dtype == torch.int64 and loss_sums.dtype == torch.float64 and correct.dtype == torch.bool
    assert counts.shape == (J, C) and loss_sums.shape == (J, C) and correct.shape == (J, N)

    check_score_against_references(counts, loss_sums, correct, c, labels, run_logits(c).cpu())


def check_score_against_references(counts, loss_sums, correct, c: dict, labels, own_logits=None) -> None:
    """closed_form_score's outputs against the references (also used by the CPU emulation's tests).

    ``own_logits`` [J, N, C]: the same pairs reduced from the kernel's own logits (one code path) must
    give exactly the same counts and correctness, loss sums to float64 rounding. Against the reference:
    equal except on near-ties of the reference's top-1 (margin < 1e-5 of scale), loss sums to 1e-5.
    """
    J, (N, C) = len(c["filters"]), c["logits"].shape
    if own_logits is not None:
        slots = torch.arange(J).repeat_interleave(N)
        c2, l2, k2 = score_reduce_ref(own_logits.reshape(J * N, C), labels.repeat(J), slots, J)
        assert torch.equal(correct, k2.view(J, N)) and torch.equal(counts, c2)
        torch.testing.assert_close(loss_sums, l2, rtol=1e-12, atol=1e-12)
    ref_logits = closed_form_logits_ref(**c)
    rc, rl, rk = closed_form_score_ref(**c, labels=labels)
    top2 = ref_logits.topk(min(2, C), dim=2).values
    margin = (top2[..., 0] - top2[..., -1]) if C > 1 else torch.full((J, N), math.inf)
    near_tie = margin < 1e-5 * max(1.0, ref_logits.abs().max().item())
    assert torch.equal(correct[~near_tie], rk[~near_tie])
    if not near_tie.any():
        assert torch.equal(counts, rc)
    torch.testing.assert_close(loss_sums, rl, rtol=1e-5, atol=1e-5)


@needs_cuda
def test_closed_form_score_public_function_and_empty():
    c = make_case()
    labels = labels_for(c)
    got = closed_form_score(**to(c, DEV), labels=labels.to(DEV), backend="cuda")
    for x, y in zip(got, run_score(c, labels)):
        assert torch.equal(x, y)
    e = make_case(N=0)
    counts, loss_sums, correct = run_score(e, torch.zeros(0, dtype=torch.int64))
    assert counts.shape == (4, 7) and not counts.any() and not loss_sums.any() and correct.shape == (4, 0)
    counts, _, correct = run_score(make_case(filters=[]), labels)
    assert counts.shape == (0, 7) and correct.shape == (0, 3)


# ---------------------------------------------------------------------------------------------
# score_reduce

def reduce_case(P, C, S, dtype=torch.float32, seed=0, specials=True):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(P, C, generator=g)).to(dtype)
    if specials and P > 3 and C > 2:
        logits[1] = 0.5                    # an all-tie row: top-1 is class 0
        logits[2, 1] = float("nan")        # NaN ranks first, as in torch.argmax
    labels = torch.randint(0, C, (P,), generator=g)
    slots = torch.randint(0, max(S, 1), (P,), generator=g).sort().values
    return logits, labels, slots


def run_reduce(logits, labels, slots, S):
    return tuple(t.cpu() for t in torch.ops.carfast.score_reduce(logits.to(DEV), labels.to(DEV), slots.to(DEV), S))


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32] + LOW)
@pytest.mark.parametrize("P, C, S", [(1, 1, 1), (37, 10, 5), (700, 3, 2), (600, 7, 3), (50, 100, 4), (0, 5, 3),
                                     (20, 33, 40), (300, 1000, 2)])
def test_score_reduce_matches_reference(dtype, P, C, S):
    logits, labels, slots = reduce_case(P, C, S, dtype)
    counts, loss_sums, correct = run_reduce(logits, labels, slots, S)
    rc, rl, rk = score_reduce_ref(logits, labels, slots, S)
    assert torch.equal(correct, rk) and torch.equal(counts, rc)
    torch.testing.assert_close(loss_sums, rl, rtol=1e-12, atol=1e-12, equal_nan=True)


@needs_cuda
def test_score_reduce_strided_and_public_function():
    logits = torch.randn(40, 12).t().contiguous().t()[:, ::2]
    labels, slots = torch.randint(0, 6, (40,)), torch.arange(40) // 7
    rc, rl, rk = score_reduce_ref(logits, labels, slots, 7)
    counts, loss_sums, correct = run_reduce(logits, labels, slots, 7)
    assert torch.equal(counts, rc) and torch.equal(correct, rk)
    torch.testing.assert_close(loss_sums, rl, rtol=1e-12, atol=1e-12)
    got = score_reduce(logits.to(DEV), labels.to(DEV), slots.to(DEV), 7, backend="cuda")
    assert all(torch.equal(x.cpu(), y) for x, y in zip(got, (counts, loss_sums, correct)))


# ---------------------------------------------------------------------------------------------
# every op: bit-for-bit repeatable, argument errors that teach, opcheck

@needs_cuda
def test_deterministic():
    c = make_case(**CF_SHAPES["N70_sparse"])
    labels = labels_for(c)
    first = run_score(c, labels)
    for _ in range(3):
        assert all(torch.equal(x, y) for x, y in zip(first, run_score(c, labels)))
        assert torch.equal(run_logits(c), run_logits(c))
    logits, labels, slots = reduce_case(3000, 10, 3, specials=False)   # no NaN: torch.equal(nan, nan) is False
    first = run_reduce(logits, labels, slots, 3)
    assert all(torch.equal(x, y) for x, y in zip(first, run_reduce(logits, labels, slots, 3)))
    k = consumer_case(**SHAPES["stride2"])
    assert torch.equal(run_consumer(k), run_consumer(k))


@needs_cuda
@pytest.mark.parametrize("call, pattern", [
    (lambda: run_consumer(dict(consumer_case(), filters=torch.tensor([0, 4] * 9)[:12])),
     r"ablated_consumer: `filters` must hold input channels of `a` in \[0, 4\), got values from 0 to 4"),
    (lambda: run_consumer(dict(consumer_case(), a=consumer_case()["a"].double())),
     r"ablated_consumer: `a` must be float32, float16 or bfloat16, got Double"),
    (lambda: call_consumer(dict(to(consumer_case(), DEV), a=consumer_case()["a"])),
     r"ablated_consumer: `a` must be a CUDA tensor, got one on cpu"),
    (lambda: run_logits(dict(make_case(), filters=torch.tensor([-1]))),
     r"closed_form_logits: `filters` must hold input channels"),
    (lambda: run_logits(dict(make_case(), z=make_case()["z"][:, :, :-1])),
     r"closed_form_logits: `z` must have shape \[N, O, Ho, Wo\] = \[3, 5, 6, 6\], got \[3, 5, 5, 6\]"),
    (lambda: run_score(make_case(), torch.tensor([0, 7, 1])),
     r"closed_form_score: `labels` must hold class indices of `logits` in \[0, 7\), got values from 0 to 7"),
    (lambda: run_reduce(torch.randn(4, 3), torch.zeros(4, dtype=torch.int64), torch.tensor([0, 1, 0, 1]), 2),
     r"score_reduce: `slots` must be non-decreasing"),
    (lambda: run_reduce(torch.randn(4, 3), torch.zeros(4, dtype=torch.int64), torch.tensor([0, 1, 2, 2]), 2),
     r"score_reduce: `slots` must hold slots in \[0, 2\)"),
])
def test_bad_input_names_the_argument(call, pattern):
    with pytest.raises(RuntimeError, match=pattern) as info:
        call()
    assert "fix:" in str(info.value)


@needs_cuda
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no_residual"])
def test_opcheck_consumer_ops(residual):
    c = to(make_case(N=2, K=3, O=4, H=5, W=5, C=3, residual=residual), DEV)
    conv = (c["a"], c["weight"], c["z"], c["scale"], c["shift"], c["residual"], c["act"])
    settings = ([1, 1], [1, 1], [1, 1])
    torch.library.opcheck(torch.ops.carfast.closed_form_logits.default,
                          conv + (c["tail"], c["logits"], c["filters"]) + settings)
    labels = torch.tensor([0, 2], device=DEV)
    torch.library.opcheck(torch.ops.carfast.closed_form_score.default,
                          conv + (c["tail"], c["logits"], c["filters"], labels) + settings)
    filters, images = torch.tensor([0, 2, 1], device=DEV), torch.tensor([1, 0, 1], device=DEV)
    for out_dtype in (None, torch.float16):
        torch.library.opcheck(torch.ops.carfast.ablated_consumer.default,
                              conv + (filters, images) + settings + (out_dtype,))
    o1 = to(make_case(N=2, K=3, O=1, H=4, W=4, C=2), DEV)     # O = 1: channels_last strides are ambiguous
    torch.library.opcheck(torch.ops.carfast.ablated_consumer.default,
                          (o1["a"], o1["weight"], o1["z"], o1["scale"], o1["shift"], o1["residual"], 1,
                           filters, images) + settings + (None,))


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_score_reduce(dtype):
    logits, labels, slots = reduce_case(30, 5, 4, dtype)
    torch.library.opcheck(torch.ops.carfast.score_reduce.default,
                          (logits.to(DEV), labels.to(DEV), slots.to(DEV), 4))
