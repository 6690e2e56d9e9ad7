"""The engine on each backend present gives the same scores as the plain-PyTorch backend.

Without a GPU the triton backend runs in Triton's interpreter on the CPU (tests/conftest.py sets
TRITON_INTERPRET=1), so the nets are small; with a GPU (and TRITON_INTERPRET=0, as
benchmarks/gpu_check.sh runs it) the triton and cuda backends run there; cuda skips without one.
"""
from __future__ import annotations

import os

import pytest
import torch
from nets import NETS, make_data

import carfast
from carfast import extensions

_WHY = {b["name"]: b["reason"] for b in extensions.backends()}
needs_triton = pytest.mark.skipif(not extensions.has_backend("triton"), reason=f"triton backend: {_WHY['triton']}")
needs_cuda = pytest.mark.skipif(not extensions.has_backend("cuda"), reason=f"cuda backend: {_WHY['cuda']}")
#: where the GPU backends run: the GPU, or the CPU in Triton's interpreter
GPU = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"

# one net per engine path: closed form with a conv consumer, closed form with a Linear consumer, the
# suffix with a fused single conv consumer, the suffix with two consumers, the full network
_CASES = ["bn_after_act", "classifier_consumer", "conv_bias", "two_consumers", "untraceable"]


def _scores(case, x, y, backend, **kw):
    """Scores of the first three filters (the interpreter is slow), on the CPU results' device."""
    return carfast.score_layer(case.model, case.layer, (x, y), backend=backend, progress=False, per_image=True,
                               filters=[0, 1, 2], **kw)


def _gpu(backend, **kw):
    return dict(backend=backend, device=GPU, **kw)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_triton),
                                     pytest.param("cuda", marks=needs_cuda)])
@pytest.mark.parametrize("net", _CASES)
def test_gpu_backend_equals_torch(net, backend):
    if backend == "cuda" and GPU != "cuda":
        pytest.skip("the cuda backend needs a CUDA device")
    case = NETS[net]()
    x, y = make_data(case, 16)
    ref = _scores(case, x, y, "torch")
    got = _scores(case, x, y, **_gpu(backend))
    assert got.backend == backend and got.method == ref.method      # the backend named is the one that ran
    assert torch.equal(got.image_correct, ref.image_correct), net
    assert torch.equal(got.correct, ref.correct)
    assert torch.allclose(got.loss_sum, ref.loss_sum, rtol=1e-5, atol=1e-6)


@needs_triton
def test_triton_fused_consumer_in_fp16():
    """The ablated_consumer kernel writing float16 for a float16 suffix, with the exact re-run."""
    case = NETS["conv_bias"]()
    x, y = make_data(case, 16)
    ref = _scores(case, x, y, "torch")
    got = _scores(case, x, y, **_gpu("triton", precision="fp16"))
    assert got.precision == "fp16"
    assert torch.equal(got.image_correct, ref.image_correct)


def test_auto_picks_the_cpu_kernels_on_cpu():
    case = NETS["bn_after_act"]()
    x, y = make_data(case, 8)
    r = _scores(case, x, y, "auto")
    assert r.backend == ("cpu" if extensions.has_backend("cpu") else "torch")


def test_cuda_backend_on_a_cpu_model_is_refused():
    case = NETS["bn_after_act"]()
    x, y = make_data(case, 8)
    with pytest.raises((RuntimeError, ValueError), match="cuda"):
        _scores(case, x, y, "cuda")
