"""The Triton kernels (carfast/ops/triton/) against the plain-PyTorch references.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before
triton is imported) on CPU tensors, in float32 and float16 only (the interpreter's bfloat16 arithmetic is
not the GPU's). With ``TRITON_INTERPRET=0`` on a CUDA machine the same tests run the compiled kernels on
the GPU, and the GPU-only tests (bfloat16, larger shapes) run too.

Exactness of top-1 decisions: score_reduce sees the very logits the reference sees, so its counts and
correct bits must equal the reference's everywhere (exact ties included). closed_form_score computes its
ablated logits in another float32 summation order than the reference, so a pair whose reference top-1
margin is below 1e-4 (relative to max(1, max |logit|)) may go either way: such near ties are excluded from
the correct-bit comparison, and the expected counts take the kernel's bit for them (the data here has
almost none; the test says how many it excluded when it fails).
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="triton is not importable: the triton backend is absent here "
                                     "(install it with `pip install triton`, Linux)")

from compare import assert_close_verbose  # noqa: E402

from carfast import extensions  # noqa: E402
from carfast.ops.ablated_consumer import ablated_consumer, ablated_consumer_ref  # noqa: E402
from carfast.ops.closed_form_logits import closed_form_logits_ref  # noqa: E402
from carfast.ops.closed_form_score import closed_form_score, closed_form_score_ref  # noqa: E402
from carfast.ops.score_reduce import score_reduce, score_reduce_ref  # noqa: E402

_OK, _WHY = extensions.has_backend("triton"), next(b["reason"] for b in extensions.backends() if b["name"] == "triton")
if not _OK:
    pytest.skip(f"triton backend unavailable: {_WHY}", allow_module_level=True)

from carfast.ops import triton as tri  # noqa: E402
from carfast.ops.triton import ablated_consumer as tri_ac  # noqa: E402
from carfast.ops.triton import closed_form_score as tri_cfs  # noqa: E402
from carfast.ops.triton import score_reduce as tri_sr  # noqa: E402

DEV = "cpu" if tri.INTERPRET else "cuda"
needs_gpu = pytest.mark.skipif(
    tri.INTERPRET or not torch.cuda.is_available(),
    reason="needs the compiled kernels on a CUDA device: " + (
        "no CUDA device here" if not torch.cuda.is_available() else
        "TRITON_INTERPRET=1 (run with TRITON_INTERPRET=0 to compile the kernels for the GPU)"))


@pytest.fixture(autouse=True, scope="module")
def _no_tf32():
    """On a GPU the references' float32 convs and matmuls must not round through TF32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# ---------------------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------------------

def make_case(N=3, K=4, O=5, H=6, W=6, kernel=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), C=10,
              residual=True, act=1, zeros=0.3, dead=(), seed=0):
    """A conv consumer with its epilogue and an affine tail, float32 on DEV.

    ``a`` has a fraction ``zeros`` of exact zeros and, for each (n, k) in ``dead`` (n None: every image),
    an all-zero channel; z is the real conv output plus a bias times 3 (so E sees both signs and values
    above 6); the labels are the intact top-1 for two images in three (the rest random), so that removing
    a filter both keeps and breaks correct answers.
    """
    g = torch.Generator().manual_seed(seed)
    kh, kw = kernel
    a = torch.randn(N, K, H, W, generator=g)
    a = torch.where(torch.rand(N, K, H, W, generator=g) < zeros, torch.zeros(()), a)
    for n, k in dead:
        a[(slice(None) if n is None else n), k] = 0
    weight = torch.randn(O, K, kh, kw, generator=g) / math.sqrt(K * kh * kw)
    z = 3 * F.conv2d(a, weight, torch.randn(O, generator=g), stride, padding, dilation)
    Ho, Wo = z.shape[2:]
    logits = 2 * torch.randn(N, C, generator=g)
    labels = torch.randint(0, C, (N,), generator=g)
    keep = torch.arange(N) % 3 != 2
    labels[keep] = logits.argmax(1)[keep]
    c = dict(a=a, weight=weight, z=z, scale=torch.rand(O, generator=g) + 0.5, shift=2 * torch.randn(O, generator=g),
             residual=2 * torch.randn(N, O, Ho, Wo, generator=g) if residual else None, act=act,
             tail=3 * torch.randn(C, O, Ho, Wo, generator=g) / math.sqrt(O * Ho * Wo), logits=logits,
             filters=torch.arange(K), labels=labels, stride=stride, padding=padding, dilation=dilation)
    return {k: v.to(DEV) if isinstance(v, torch.Tensor) else v for k, v in c.items()}


def consumer_args(c, P=7, dtype=torch.float32, seed=1):
    """ablated_consumer's arguments from a case: P random (filter, image) pairs, float tensors in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    N, K = c["a"].shape[:2]
    conv = {k: (c[k].to(dtype) if c[k] is not None else None) for k in ("a", "weight", "z", "scale", "shift",
                                                                      "residual")}
    return dict(conv, act=c["act"], filters=torch.randint(0, K, (P,), generator=g).to(DEV),
                images=torch.randint(0, N, (P,), generator=g).to(DEV), stride=c["stride"], padding=c["padding"],
                dilation=c["dilation"])


def score_args(c):
    keys = ("a", "weight", "z", "scale", "shift", "residual", "act", "tail", "logits", "filters", "labels", "stride",
            "padding", "dilation")
    return {k: c[k] for k in keys}


def near_ties(logits, rel=1e-4):
    """[..., C] -> [...] bool: top-1 minus top-2 below rel * max(1, max |logit|) (never, with one class)."""
    if logits.shape[-1] < 2:
        return torch.zeros(logits.shape[:-1], dtype=torch.bool, device=logits.device)
    top2 = torch.topk(logits, 2, dim=-1).values
    return top2[..., 0] - top2[..., 1] < rel * logits.abs().amax(-1).clamp(min=1.0)


# ---------------------------------------------------------------------------------------------------------
# ablated_consumer
# ---------------------------------------------------------------------------------------------------------

def check_consumer(args, out_dtype=None, what=""):
    out = ablated_consumer(**args, out_dtype=out_dtype, backend="triton")
    ref = ablated_consumer_ref(**args, out_dtype=out_dtype)
    assert out.is_contiguous(memory_format=torch.channels_last), f"{what}: result not channels_last"
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    if out.dtype == torch.float32:
        assert_close_verbose(out, ref, atol=1e-5 * scale, rtol=1e-5, what=what)
    else:  # same float32 arithmetic, rounded once: at most one unit in the last place apart
        ulp = 2.0 ** -10 if out.dtype == torch.float16 else 2.0 ** -7
        assert_close_verbose(out, ref, atol=1e-5 * scale, rtol=ulp, what=what)
    return out, ref


CONSUMER_SHAPES = {
    "base": dict(),
    "K1_O1": dict(K=1, O=1, residual=False, act=0),
    "odd_7x3_k3x1": dict(H=7, W=3, kernel=(3, 1), padding=(1, 0)),
    "odd_5x5_k5_pad2": dict(H=5, W=5, kernel=(5, 5), padding=(2, 2), act=2),
    "stride2_pad0": dict(H=7, W=5, stride=(2, 2), padding=(0, 0)),
    "dilation2_pad2": dict(H=7, W=6, dilation=(2, 2), padding=(2, 2), residual=False),
    "rect_mixed": dict(H=7, W=9, kernel=(1, 3), stride=(1, 2), padding=(0, 2), dilation=(1, 2), act=2),
}


@pytest.mark.parametrize("name", list(CONSUMER_SHAPES))
def test_ablated_consumer_shapes(name):
    check_consumer(consumer_args(make_case(**CONSUMER_SHAPES[name])), what=name)


def test_ablated_consumer_one_pair_and_short_blocks(monkeypatch):
    """P = 1, and tiles smaller than the map: 4 position blocks (the last short) x 2 channel blocks (idem)."""
    check_consumer(consumer_args(make_case(), P=1), what="P=1")
    monkeypatch.setattr(tri_ac, "_TILE", 16)
    monkeypatch.setattr(tri_ac, "_MAX_BLOCK_O", 4)
    check_consumer(consumer_args(make_case(H=5, W=3, O=5), P=3), what="short blocks")   # 15 positions / 4, 5 / 4


@pytest.mark.parametrize("out_dtype", [None, torch.float32], ids=["out_f16", "out_f32"])
def test_ablated_consumer_float16(out_dtype):
    out, _ = check_consumer(consumer_args(make_case(O=6), dtype=torch.float16), out_dtype=out_dtype, what="f16")
    assert out.dtype == (out_dtype or torch.float16)


def test_ablated_consumer_any_layout():
    c = make_case(N=3, K=4, O=6, H=6, W=5)
    args = consumer_args(c, P=9)
    expected = ablated_consumer_ref(**args)
    args["a"] = args["a"].contiguous(memory_format=torch.channels_last)
    args["weight"] = args["weight"].permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)
    args["z"] = args["z"].transpose(2, 3).contiguous().transpose(2, 3)
    args["residual"] = args["residual"].contiguous(memory_format=torch.channels_last)
    args["filters"] = args["filters"].repeat_interleave(2)[::2]
    assert not (args["a"].is_contiguous() or args["weight"].is_contiguous() or args["filters"].is_contiguous())
    out = ablated_consumer(**args, backend="triton")
    assert_close_verbose(out, expected, atol=1e-5 * max(1.0, expected.abs().max().item()), rtol=1e-5)


def test_ablated_consumer_deterministic_and_empty():
    args = consumer_args(make_case(), P=5)
    assert torch.equal(ablated_consumer(**args, backend="triton"), ablated_consumer(**args, backend="triton"))
    args["filters"], args["images"] = args["filters"][:0], args["images"][:0]
    out = ablated_consumer(**args, backend="triton")
    assert out.shape == (0, 5, 6, 6) and out.dtype == torch.float32


@pytest.mark.parametrize("change, pattern", [
    (lambda a: a.update(weight=a["weight"][:, :2]), r"ablated_consumer: weight must be \[O, K=4, kh, kw\]"),
    (lambda a: a.update(z=a["z"][..., :3]), r"ablated_consumer: z must be the conv's output"),
    (lambda a: a.update(act=3), r"act must be 0 \(identity\), 1 \(relu\) or 2 \(relu6\), got 3"),
    (lambda a: a.update(filters=a["filters"].int()), r"filters must be a 1-D int64 tensor"),
    (lambda a: a.update(images=a["images"][:2]), r"images must have 7 elements, got 2"),
    (lambda a: a.update(filters=a["filters"] + 4), r"filters must lie in \[0, 4\)"),
    (lambda a: a.update(a=a["a"].double()), r"a must be float32, float16, bfloat16, got torch.float64"),
    (lambda a: a.update(stride=(1, 2, 3)), r"stride must be an int or a pair"),
])
def test_ablated_consumer_bad_input(change, pattern):
    args = consumer_args(make_case())
    change(args)
    with pytest.raises(ValueError, match=pattern):
        ablated_consumer(**args, backend="triton")


def test_ablated_consumer_opcheck():
    args = consumer_args(make_case(N=2, K=2, O=3, H=4, W=4), P=3)
    order = ("a", "weight", "z", "scale", "shift", "residual", "act", "filters", "images")
    pos = [args[k] for k in order] + [list(args["stride"]), list(args["padding"]), list(args["dilation"]), None]
    torch.library.opcheck(torch.ops.carfast_triton.ablated_consumer.default, pos)


# ---------------------------------------------------------------------------------------------------------
# score_reduce
# ---------------------------------------------------------------------------------------------------------

def check_reduce(logits, labels, slots, S, what=""):
    got = score_reduce(logits, labels, slots, S, backend="triton")
    ref = score_reduce_ref(logits, labels, slots, S)
    assert torch.equal(got[2], ref[2]), f"{what}: correct bits differ at {(got[2] != ref[2]).nonzero().tolist()}"
    assert torch.equal(got[0], ref[0]), f"{what}: counts differ:\n{got[0]}\n{ref[0]}"
    assert_close_verbose(got[1], ref[1], atol=1e-12, rtol=1e-12, what=f"{what} loss_sums")
    return got


def reduce_case(P, C, S, dtype=torch.float32, ties=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randint(0, 3, (P, C), generator=g).float() if ties else 3 * torch.randn(P, C, generator=g))
    labels = torch.randint(0, C, (P,), generator=g)
    labels[::2] = logits.argmax(1)[::2]                # plenty of correct pairs
    slots = torch.randint(0, S, (P,), generator=g).sort().values
    return logits.to(dtype).to(DEV), labels.to(DEV), slots.to(DEV), S


@pytest.mark.parametrize("P, C, S, dtype, ties", [
    (1, 10, 1, torch.float32, False),                  # one pair
    (37, 10, 6, torch.float32, False),                 # some slots empty
    (50, 3, 4, torch.float16, False),
    (40, 7, 3, torch.float32, True),                   # exact ties: the lowest class index wins
    (9, 1, 2, torch.float32, False),                   # one class
], ids=["P1", "C10_empty_slots", "C3_f16", "ties", "C1"])
def test_score_reduce(P, C, S, dtype, ties):
    check_reduce(*reduce_case(P, C, S, dtype, ties), what=f"P={P} C={C} S={S}")


def test_score_reduce_many_blocks_per_slot(monkeypatch):
    """Segments longer than a block, and not multiples of it; strided logits."""
    monkeypatch.setattr(tri_sr, "_TILE", 64)           # BLOCK_P = 4 with 16 padded classes
    logits, labels, slots, S = reduce_case(103, 10, 3, seed=3)
    check_reduce(logits.t().contiguous().t(), labels, slots, S, what="many blocks")


def test_score_reduce_deterministic_and_empty():
    args = reduce_case(300, 10, 4, seed=5)
    one, two = score_reduce(*args, backend="triton"), score_reduce(*args, backend="triton")
    assert all(torch.equal(x, y) for x, y in zip(one, two))
    counts, loss_sums, correct = score_reduce(args[0][:0], args[1][:0], args[2][:0], 3, backend="triton")
    assert counts.shape == (3, 10) and not counts.any() and not loss_sums.any() and correct.shape == (0,)


@pytest.mark.parametrize("change, pattern", [
    (lambda a: a.__setitem__(2, a[2].flip(0)), r"slots must be non-decreasing"),
    (lambda a: a.__setitem__(1, a[1].int()), r"labels must be int64"),
    (lambda a: a.__setitem__(1, a[1] + 10), r"labels must lie in \[0, 10\)"),
    (lambda a: a.__setitem__(3, 2), r"slots reach 3 but num_slots=2"),
    (lambda a: a.__setitem__(0, a[0].long()), r"logits must be float32, float16 or bfloat16"),
])
def test_score_reduce_bad_input(change, pattern):
    args = list(reduce_case(20, 10, 4, seed=1))
    change(args)
    with pytest.raises(ValueError, match=pattern):
        torch.ops.carfast_triton.score_reduce(*args)


def test_score_reduce_opcheck():
    torch.library.opcheck(torch.ops.carfast_triton.score_reduce.default, list(reduce_case(12, 5, 3)))


# ---------------------------------------------------------------------------------------------------------
# closed_form_score
# ---------------------------------------------------------------------------------------------------------

def check_score(c, what=""):
    """closed_form_score on triton against the reference (near ties excluded, see the module docstring)."""
    args = score_args(c)
    counts, loss_sums, correct = closed_form_score(**args, backend="triton")
    r_counts, r_loss, r_correct = closed_form_score_ref(**args)
    abl = closed_form_logits_ref(**{k: v for k, v in args.items() if k != "labels"})      # [J, N, C]
    near = near_ties(abl)
    ok = ~near
    bad = ((correct != r_correct) & ok).nonzero().tolist()
    assert not bad, f"{what}: correct bits differ at {bad} ({int(near.sum())} near ties excluded)"
    mixed = torch.where(near, correct, r_correct)              # the kernel's bit where it may go either way
    J, C = counts.shape
    expected = torch.zeros(J, C, dtype=torch.int64, device=counts.device)
    expected.index_put_((torch.arange(J, device=counts.device).repeat_interleave(c["labels"].shape[0]),
                         c["labels"].repeat(J)), mixed.reshape(-1).long(), accumulate=True)
    assert torch.equal(counts, expected), f"{what}: counts differ ({int(near.sum())} near ties):\n{counts}\n{expected}"
    assert_close_verbose(loss_sums, r_loss, atol=1e-5, rtol=1e-5, what=f"{what} loss_sums")
    return counts, loss_sums, correct


SCORE_SHAPES = {
    "base_C10": dict(),
    "K1_O1": dict(K=1, O=1, act=0),
    "C3_no_residual": dict(C=3, residual=False),
    "odd_7x3": dict(H=7, W=3, kernel=(3, 1), padding=(1, 0), act=2),
    "odd_5x5_k5_pad2": dict(H=5, W=5, kernel=(5, 5), padding=(2, 2)),
    "stride2_pad0": dict(H=7, W=5, stride=(2, 2), padding=(0, 0), act=0),
    "dilation2_pad2": dict(H=7, W=6, dilation=(2, 2), padding=(2, 2), act=2, residual=False),
    "N1_C1": dict(N=1, C=1),
    "free_zeros": dict(N=4, K=3, dead=((None, 1), (2, 0))),   # channel 1 zero everywhere, channel 0 in image 2
}


@pytest.mark.parametrize("name", list(SCORE_SHAPES))
def test_closed_form_score_shapes(name):
    check_score(make_case(**SCORE_SHAPES[name]), what=name)


def test_closed_form_score_chunks_and_short_blocks(monkeypatch):
    """Class chunks (6 classes in chunks of 4, the last short), tiles smaller than the map (3 position
    tiles, the last short, x 2 channel tiles, the last short), image blocks of 2 over 3 images (the last
    short), a free-zero scan in several steps; then J = 1 and repeated filters."""
    c = make_case(N=3, K=2, O=5, H=3, W=3, kernel=(1, 3), padding=(0, 1), C=6, dead=((1, 1),))
    check_score(dict(c, filters=torch.tensor([1], device=DEV)), what="J=1")
    check_score(dict(c, filters=torch.tensor([1, 0, 1], device=DEV)), what="repeated filters")
    monkeypatch.setattr(tri_cfs, "_MAX_BLOCK_C", 4)
    monkeypatch.setattr(tri_cfs, "_TILE", 64)          # [4 classes, 4 positions, 4 channels]
    monkeypatch.setattr(tri_cfs, "_MAX_BLOCK_O", 4)
    monkeypatch.setattr(tri_cfs, "_BLOCK_N", 2)
    monkeypatch.setattr(tri_cfs, "_BLOCK_A", 4)
    check_score(c, what="chunks")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")   # the interpreter's NaN arithmetic
def test_closed_form_score_free_zero_is_exactly_the_logits():
    """An all-zero channel gives exactly the intact logits' results, and its work is skipped: a NaN in the
    tail reaches every live pair (as in the reference) but no free-zero pair (the reference gives NaN
    there too, 0 * NaN; the contract asks for logits[n] exactly)."""
    c = make_case(N=4, K=3, dead=((None, 1), (2, 0)))
    intact = score_reduce_ref(c["logits"], c["labels"], torch.zeros(4, dtype=torch.int64, device=DEV), 1)
    counts, loss_sums, correct = check_score(c, what="free zeros")
    assert torch.equal(correct[1], intact[2]) and torch.equal(counts[1], intact[0][0])
    assert_close_verbose(loss_sums[1], intact[1][0], atol=1e-12, rtol=1e-12, what="free-zero loss")
    c["tail"][:, 0, 0, 0] = float("nan")
    counts, loss_sums, correct = closed_form_score(**score_args(c), backend="triton")
    assert torch.equal(correct[1], intact[2])
    assert_close_verbose(loss_sums[1], intact[1][0], atol=1e-12, rtol=1e-12, what="free zero, NaN tail")
    assert loss_sums[0].isnan().any() and loss_sums[2].isnan().any()


def test_closed_form_score_any_layout():
    c = make_case(N=3, K=4, O=6, H=6, W=5)
    expected = closed_form_score_ref(**score_args(c))
    c["a"] = c["a"].contiguous(memory_format=torch.channels_last)
    c["z"] = c["z"].transpose(2, 3).contiguous().transpose(2, 3)
    c["tail"] = c["tail"].transpose(0, 1).contiguous().transpose(0, 1)
    c["logits"] = c["logits"].t().contiguous().t()
    c["filters"] = c["filters"].repeat_interleave(2)[::2]
    got = closed_form_score(**score_args(c), backend="triton")
    assert torch.equal(got[0], expected[0]) and torch.equal(got[2], expected[2])
    assert_close_verbose(got[1], expected[1], atol=1e-5, rtol=1e-5)


def test_closed_form_score_deterministic_and_empty():
    c = make_case(N=9, K=2, O=4, H=4, W=4)                   # 9 images: blocks of 8 and 1
    one, two = (closed_form_score(**score_args(c), backend="triton") for _ in range(2))
    assert all(torch.equal(x, y) for x, y in zip(one, two))
    c["filters"] = c["filters"][:0]
    counts, loss_sums, correct = closed_form_score(**score_args(c), backend="triton")
    assert counts.shape == (0, 10) and loss_sums.shape == (0, 10) and correct.shape == (0, 9)


@pytest.mark.parametrize("change, pattern", [
    (lambda c: c.update(a=c["a"].half()), r"closed_form_score: a must be float32, got torch.float16"),
    (lambda c: c.update(tail=c["tail"][:, :, 1:]), r"tail must be \[classes, O, Ho, Wo\] = \(10, 5, 6, 6\)"),
    (lambda c: c.update(labels=c["labels"] + 10), r"labels must lie in \[0, 10\)"),
    (lambda c: c.update(filters=torch.tensor([4], device=DEV)), r"filters must lie in \[0, 4\)"),
    (lambda c: c.update(logits=c["logits"][:2]), r"logits must be \[N=3, classes\]"),
])
def test_closed_form_score_bad_input(change, pattern):
    c = make_case()
    change(c)
    with pytest.raises(ValueError, match=pattern):
        closed_form_score(**score_args(c), backend="triton")


def test_closed_form_score_opcheck():
    c = make_case(N=2, K=2, O=2, H=3, W=3, C=3)
    order = ("a", "weight", "z", "scale", "shift", "residual", "act", "tail", "logits", "filters", "labels")
    pos = [c[k] for k in order] + [list(c["stride"]), list(c["padding"]), list(c["dilation"])]
    torch.library.opcheck(torch.ops.carfast_triton.closed_form_score.default, pos)


# ---------------------------------------------------------------------------------------------------------
# the compiled kernels (no GPU needed to compile; a GPU to run)
# ---------------------------------------------------------------------------------------------------------

_COMPILE = r"""
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile
except ImportError as exc:
    print("SKIP", exc); sys.exit(0)
from carfast.ops.triton import ablated_consumer as ac, closed_form_score as cfs, score_reduce as sr

conv = dict(SH=2, SW=1, PH=1, PW=0, DH=1, DW=2, KH=3, KW=2, HAS_RES=True, ACT=2)
def build(fn, ptrs, consts, warps):
    sig = {n: "constexpr" if n in consts else ptrs.get(n, "i32") for n in fn.arg_names}
    compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
f = lambda names, t: {n: t for n in names}
build(ac._ablated_consumer_kernel, {**f(["a_ptr", "w_ptr", "z_ptr", "scale_ptr", "shift_ptr", "res_ptr"], "*bf16"),
      "out_ptr": "*fp16", "filters_ptr": "*i64", "images_ptr": "*i64"}, dict(conv, BLOCK_HW=32, BLOCK_O=16), 4)
build(cfs._closed_form_score_kernel, {**f(["a_ptr", "w_ptr", "z_ptr", "scale_ptr", "shift_ptr", "res_ptr", "tail_ptr",
      "logits_ptr"], "*fp32"), "filters_ptr": "*i64", "labels_ptr": "*i64", "correct_ptr": "*i1",
      "part_count_ptr": "*i32", "part_loss_ptr": "*fp64"},
      dict(conv, BLOCK_N=8, BLOCK_C=16, BLOCK_HW=8, BLOCK_O=16, BLOCK_A=256), 8)
build(cfs._sum_blocks_kernel, {"part_count_ptr": "*i32", "part_loss_ptr": "*fp64", "counts_ptr": "*i64",
      "loss_ptr": "*fp64"}, dict(BLOCK_C=16), 4)
build(sr._score_reduce_kernel, {"logits_ptr": "*bf16", "labels_ptr": "*i64", "bounds_ptr": "*i64", "counts_ptr": "*i64",
      "loss_ptr": "*fp64", "correct_ptr": "*i1"}, dict(BLOCK_P=32, BLOCK_C=16), 4)
print("OK")
"""


def test_kernels_compile_for_hopper(tmp_path):
    """The interpreter does not type-check like the compiler: compile every kernel for sm_90 (to a cubin,
    with Triton's own ptxas) in a fresh process without TRITON_INTERPRET. Needs no GPU."""
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path))
    env.pop("TRITON_INTERPRET", None)
    run = subprocess.run([sys.executable, "-c", _COMPILE], capture_output=True, text=True, env=env, timeout=300)
    if run.stdout.startswith("SKIP"):
        pytest.skip(f"this triton cannot compile ahead of time: {run.stdout.strip()}")
    assert run.returncode == 0 and run.stdout.strip().endswith("OK"), run.stderr[-4000:]


@needs_gpu
def test_gpu_bfloat16_and_larger_shapes():
    c = make_case(N=24, K=16, O=32, H=16, W=16, C=100, zeros=0.5, dead=((None, 3),), seed=7)
    check_consumer(consumer_args(c, P=200, dtype=torch.bfloat16), what="bf16")
    check_consumer(consumer_args(c, P=200, dtype=torch.bfloat16), out_dtype=torch.float32, what="bf16 -> f32")
    check_score(c, what="GPU C=100")
    logits, labels, slots, S = reduce_case(5000, 100, 37, seed=2)
    check_reduce(logits.bfloat16(), labels, slots, S, what="bf16")
    one = closed_form_score(**score_args(c), backend="triton")
    two = closed_form_score(**score_args(c), backend="triton")
    assert all(torch.equal(x, y) for x, y in zip(one, two))


@needs_gpu
def test_gpu_large_grid():
    """Many pairs (int64 offsets), O above one channel block, a 1000-class reduction."""
    c = make_case(N=64, K=8, O=300, H=8, W=8, C=10, seed=9)
    check_consumer(consumer_args(c, P=4096), what="P=4096 O=300")
    check_reduce(*reduce_case(20000, 1000, 50, seed=4), what="C=1000")
