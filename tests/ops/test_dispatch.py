"""The one registry that picks an op's implementation on a backend (``carfast.ops.dispatch``)."""
from __future__ import annotations

import pytest
import torch

from carfast import extensions
from carfast.ops import dispatch
from carfast.ops.score_reduce import score_reduce, score_reduce_ref


def test_every_op_has_its_reference_and_the_registry_lists_the_kernels():
    kernels = dispatch.kernels()
    assert set(kernels) == {"ablated_consumer", "closed_form_logits", "closed_form_score", "score_reduce"}
    assert kernels["closed_form_logits"] == ["cpu", "cuda"]
    assert set(kernels["score_reduce"]) == {"triton", "cuda"}
    table = {b["name"]: b["kernels"] for b in extensions.backends()}
    assert table["cpu"] == ["closed_form_logits", "closed_form_score"] and table["torch"] == []


def test_a_backend_without_a_kernel_or_for_top_k_runs_the_reference():
    assert not dispatch.has_kernel("score_reduce", "cpu") and dispatch.has_kernel("score_reduce", "cuda")
    reference = dispatch.implementation("score_reduce", "torch")
    assert dispatch.implementation("score_reduce", "cpu") is reference
    # top-5 where the kernels count top-1: the reference, without asking whether cuda is available
    assert dispatch.implementation("score_reduce", "cuda", topk=5) is reference
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(6, 7, generator=g), torch.randint(0, 7, (6,), generator=g)
    slots = torch.tensor([0, 0, 1, 1, 1, 2])
    for got, want in zip(score_reduce(logits, labels, slots, 3, backend="cuda", topk=5),
                         score_reduce_ref(logits, labels, slots, 3, 5)):
        assert torch.equal(got, want)


def test_unknown_backends_and_a_kernel_without_its_reference_are_refused():
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        dispatch.implementation("score_reduce", "gpu")
    with pytest.raises(ValueError, match="unknown backend 'npu'.*extensions.py"):
        dispatch.register("score_reduce", "npu", score_reduce_ref)
    with pytest.raises(ValueError, match="reference of 'no_such_op'"):
        dispatch.register("no_such_op", "cpu", score_reduce_ref)
    assert "no_such_op" not in dispatch.kernels()


@pytest.mark.skipif(extensions.has_backend("cuda"), reason="checks the error where cuda is missing")
def test_a_kernel_on_a_missing_backend_says_why():
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
        dispatch.implementation("score_reduce", "cuda")
