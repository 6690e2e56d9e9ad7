"""Micro-benchmark of the closed_form_logits op: the plain-PyTorch reference vs the C++/OpenMP kernel.

    . .venv/bin/activate
    pytest benchmarks/bench_closed_form_logits.py --benchmark-only
    pytest benchmarks/bench_closed_form_logits.py --benchmark-only \
        --benchmark-json=benchmarks/results/closed_form_logits.json

One ResNet-56 layer3-like case, both providers in the same run (compare rows of the same run only:
numbers from a shared, busy CPU swing between minutes): N=500 images, the consumer a 3x3 conv with
K=64 inputs and O=64 outputs on 8x8 maps, padding 1, stride 1; relu epilogue with a residual; tail
[10, 64, 8, 8]; a = relu of a standard normal (about half exact zeros); all 64 filters. Before timing,
the kernel's result is checked against the reference. Threads: torch's default
(torch.get_num_threads(), recorded in extra_info); set OMP_NUM_THREADS to change it.

Not collected by the default `pytest` run (testpaths = ["tests"] in pyproject.toml).
"""
from __future__ import annotations

import pytest
import torch

from carfast import _ext
from carfast.ops.closed_form_logits import ACTIVATIONS, closed_form_logits

SHAPE = dict(N=500, K=64, O=64, H=8, W=8, kernel=3, classes=10)
ROUNDS = {"torch": 5, "cpu": 30}


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
    )


@pytest.mark.parametrize("provider", ["torch", "cpu"])
def test_closed_form_logits_resnet56_layer3(benchmark, case, provider):
    if not _ext.has_backend(provider):
        reason = next(b["reason"] for b in _ext.backends() if b["name"] == provider)
        pytest.skip(f"backend {provider!r} unavailable: {reason}")
    if provider != "torch":
        out = closed_form_logits(**case, backend=provider)
        ref = closed_form_logits(**case, backend="torch")
        scale = max(1.0, ref.abs().max().item())
        torch.testing.assert_close(out, ref, atol=1e-5 * scale, rtol=1e-5)

    benchmark.group = "closed_form_logits resnet56-layer3 N=500 K=O=64 8x8 3x3"
    benchmark.extra_info.update(SHAPE, provider=provider, threads=torch.get_num_threads(),
                                zeros_in_a=float((case["a"] == 0).float().mean()))
    benchmark.pedantic(closed_form_logits, kwargs=dict(case, backend=provider), rounds=ROUNDS[provider],
                       warmup_rounds=1, iterations=1)
