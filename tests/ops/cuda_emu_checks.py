"""Running carfast's CUDA ops on the CPU emulation (tests/ops/cuda_emu/) and checking them against their
plain-PyTorch references in carfast/ops/, with the tolerances of the GPU tests (tests/ops/test_cuda_ops.py):
shared by the kernel tests (test_cuda_emu_kernels.py) and the broken-kernel tests (test_cuda_emu_mutants.py).
"""
from __future__ import annotations

import torch
from compare import assert_close_verbose
from test_cuda_ops import CONV_KEYS, check_score_against_references, tol

from carfast.ops.ablated_consumer import ablated_consumer_ref
from carfast.ops.closed_form_logits import closed_form_logits_ref
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
    check_score_against_references(counts, loss_sums, correct, c, labels, own_logits)


# ---------------------------------------------------------------------------------------------
# score_reduce

def check_reduce(got, logits, labels, slots, S) -> None:
    counts, loss_sums, correct = got
    assert correct.view(torch.uint8).le(1).all(), "correct holds bytes other than 0 and 1 (left unwritten?)"
    rc, rl, rk = score_reduce_ref(logits, labels, slots, S)
    assert torch.equal(correct, rk) and torch.equal(counts, rc)
    torch.testing.assert_close(loss_sums, rl, rtol=1e-12, atol=1e-12, equal_nan=True)
