"""Each op on each backend that runs here, the plain-PyTorch reference (``torch``) as the baseline.

One ResNet-56 layer3-like case (the shapes the closed form and the fused consumer see there): N=500
images, the consumer a 3x3 conv with K=64 inputs and O=64 outputs on 8x8 maps, padding 1; relu
epilogue with a residual; an affine tail [10, 64, 8, 8]; a = relu of a standard normal (about half
exact zeros); all 64 filters. ``ablated_consumer`` and ``score_reduce`` run 2,048 (filter, image) pairs.
Every backend's result is checked against the reference before it is timed. The GPU backends (triton,
cuda) run where a GPU is; here they are skipped with the reason.
"""
from __future__ import annotations

import pytest
import torch

from carfast import extensions
from carfast.ops.ablated_consumer import ablated_consumer
from carfast.ops.closed_form_logits import ACTIVATIONS, closed_form_logits
from carfast.ops.closed_form_score import closed_form_score
from carfast.ops.score_reduce import score_reduce

SHAPE = dict(N=500, K=64, O=64, H=8, W=8, kernel=3, classes=10)
PAIRS = 2048
BACKENDS = ["torch", "cpu", "triton", "cuda"]
ROUNDS = {"torch": 5, "cpu": 20, "triton": 50, "cuda": 50}


def _device(backend: str) -> str:
    if not extensions.has_backend(backend):
        reason = next(b["reason"] for b in extensions.backends() if b["name"] == backend)
        pytest.skip(f"backend {backend!r} unavailable: {reason}")
    return "cuda" if backend in ("triton", "cuda") else "cpu"


@pytest.fixture(scope="module")
def case():
    g = torch.Generator().manual_seed(0)
    N, K, O, H, W, k, C = (SHAPE[x] for x in ("N", "K", "O", "H", "W", "kernel", "classes"))
    return dict(
        a=torch.relu(torch.randn(N, K, H, W, generator=g)),
        weight=torch.randn(O, K, k, k, generator=g) / (K * k * k) ** 0.5,
        z=torch.randn(N, O, H, W, generator=g),
        scale=torch.rand(O, generator=g) + 0.5,
        shift=0.1 * torch.randn(O, generator=g),
        residual=torch.randn(N, O, H, W, generator=g),
        act=ACTIVATIONS["relu"],
        tail=torch.randn(C, O, H, W, generator=g) / (O * H * W) ** 0.5,
        logits=torch.randn(N, C, generator=g),
        filters=torch.arange(K),
        stride=(1, 1), padding=(1, 1), dilation=(1, 1),
    ), torch.randint(0, C, (N,), generator=g)


def _on(args: dict, device: str) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}


def _time(benchmark, group, backend, fn, kwargs):
    benchmark.group = group
    benchmark.extra_info.update(SHAPE, backend=backend, threads=torch.get_num_threads())
    sync = torch.cuda.synchronize if _device(backend) == "cuda" else (lambda: None)

    def run():
        out = fn(**kwargs)
        sync()
        return out
    benchmark.pedantic(run, rounds=ROUNDS[backend], warmup_rounds=1, iterations=1)


def _close(got, ref):
    for g, r in zip(got if isinstance(got, tuple) else (got,), ref if isinstance(ref, tuple) else (ref,)):
        g = g.cpu()
        if g.dtype in (torch.bool, torch.int64):
            assert torch.equal(g, r.cpu())
        else:
            scale = max(1.0, r.abs().max().item())
            torch.testing.assert_close(g.to(r.dtype), r.cpu(), atol=1e-4 * scale, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_closed_form_logits(benchmark, case, backend):
    args = _on(dict(case[0], backend=backend), _device(backend))
    _close(closed_form_logits(**args), closed_form_logits(**dict(case[0], backend="torch")))
    _time(benchmark, "closed_form_logits: N=500 K=O=64 8x8 3x3", backend, closed_form_logits, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_closed_form_score(benchmark, case, backend):
    base, labels = case
    args = _on(dict(base, labels=labels, backend=backend), _device(backend))
    ref = closed_form_score(**dict(base, labels=labels, backend="torch"))
    _close(closed_form_score(**args)[:2], ref[:2])
    _time(benchmark, "closed_form_score: N=500 K=O=64 8x8 3x3", backend, closed_form_score, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ablated_consumer(benchmark, case, backend):
    base, _ = case
    g = torch.Generator().manual_seed(1)
    pairs = dict(filters=torch.randint(0, SHAPE["K"], (PAIRS,), generator=g).sort().values,
                 images=torch.randint(0, SHAPE["N"], (PAIRS,), generator=g))
    args = {k: v for k, v in base.items() if k not in ("tail", "logits", "filters")}
    args = _on(dict(args, **pairs, backend=backend), _device(backend))
    ref = ablated_consumer(**{k: v for k, v in base.items() if k not in ("tail", "logits", "filters")}, **pairs)
    _close(ablated_consumer(**args), ref)
    _time(benchmark, f"ablated_consumer: {PAIRS} pairs, K=O=64 8x8 3x3", backend, ablated_consumer, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_score_reduce(benchmark, backend):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(PAIRS * 8, 10, generator=g)
    labels = torch.randint(0, 10, (PAIRS * 8,), generator=g)
    slots = torch.arange(PAIRS * 8) // 256
    args = _on(dict(logits=logits, labels=labels, slots=slots, num_slots=PAIRS * 8 // 256, backend=backend),
               _device(backend))
    _close(score_reduce(**args), score_reduce(logits, labels, slots, PAIRS * 8 // 256))
    _time(benchmark, f"score_reduce: {PAIRS * 8} pairs, 10 classes", backend, score_reduce, args)
