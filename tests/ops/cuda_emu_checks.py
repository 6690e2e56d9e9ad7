"""Running carfast's CUDA ops on the CPU emulation (tests/ops/cuda_emu/) and checking them against their
plain-PyTorch references in carfast/ops/, with the tolerances of the GPU tests (tests/ops/test_cuda_ops.py):
shared by the kernel tests (test_cuda_emu_kernels.py) and the broken-kernel tests (test_cuda_emu_mutants.py).
"""
from __future__ import annotations

import math

import torch
from compare import assert_close_verbose
from test_cuda_ops import CONV_KEYS, tol

from carfast.ops.ablated_consumer import ablated_consumer_ref
from carfast.ops.closed_form_logits import closed_form_logits_ref
from carfast.ops.closed_form_score import closed_form_score_ref
from carfast.ops.score_reduce import score_reduce_ref


def conv_args(c: dict) -> tuple:
    return tuple(c[k] for k in CONV_KEYS) + (c["act"],)


def settings(c: dict) -> tuple:
    return tuple(c["stride"]), tuple(c["padding"]), tuple(c["dilation"])


# ---------------------------------------------------------------------------------------------
# ablated_consumer (the cases of test_cuda_ops.py)

def consumer_ref(c: dict, out_dtype=None) -> torch.Tensor:
    return ablated_consumer_ref(**c, out_dtype=out_dtype)


def run_consumer(emu, c: dict, out_dtype=None) -> torch.Tensor:
    return emu.ablated_consumer(*conv_args(c), c["filters"], c["images"], *settings(c), out_dtype)


def check_consumer(out: torch.Tensor, ref: torch.Tensor, what: str = "") -> None:
    assert out.shape == ref.shape and out.stride() == ref.stride() and out.dtype == ref.dtype
    assert_close_verbose(out, ref, atol=tol(ref), rtol=1e-5, what=what)


WIDE = dict(N=1, K=2, O=3, H=3, W=3000, C=2)   # a block needs over 48 KiB of shared memory: the opt-in path


# ---------------------------------------------------------------------------------------------
# closed_form_logits and closed_form_score (one kernel)

def run_logits(emu, c: dict) -> torch.Tensor:
    return emu.closed_form_logits(*conv_args(c), c["tail"], c["logits"], c["filters"], *settings(c))


def run_score(emu, c: dict, labels: torch.Tensor):
    return emu.closed_form_score(*conv_args(c), c["tail"], c["logits"], c["filters"], labels, *settings(c))


def check_logits(out: torch.Tensor, c: dict, what: str = "") -> None:
    ref = closed_form_logits_ref(**c)
    assert_close_verbose(out, ref, atol=tol(ref, 2e-5), rtol=1e-5, what=what)
    for j, k in enumerate(c["filters"].tolist()):          # free zeros: exactly the intact logits
        zero = ~c["a"][:, k].flatten(1).ne(0).any(1)
        assert torch.equal(out[j][zero], c["logits"][zero])


def check_score(got, c: dict, labels: torch.Tensor, own_logits: torch.Tensor | None = None) -> None:
    """As test_cuda_ops: equal to the reference except on its near-ties; loss sums to 1e-5."""
    counts, loss_sums, correct = got
    J, (N, C) = len(c["filters"]), c["logits"].shape
    assert counts.shape == (J, C) and loss_sums.shape == (J, C) and correct.shape == (J, N)
    assert correct.view(torch.uint8).le(1).all(), "correct holds bytes other than 0 and 1 (left unwritten?)"
    if own_logits is not None:   # reduced from the kernel's own logits: exactly the same decisions
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


# ---------------------------------------------------------------------------------------------
# score_reduce

def check_reduce(got, logits, labels, slots, S) -> None:
    counts, loss_sums, correct = got
    assert correct.view(torch.uint8).le(1).all(), "correct holds bytes other than 0 and 1 (left unwritten?)"
    rc, rl, rk = score_reduce_ref(logits, labels, slots, S)
    assert torch.equal(correct, rk) and torch.equal(counts, rc)
    torch.testing.assert_close(loss_sums, rl, rtol=1e-12, atol=1e-12, equal_nan=True)
