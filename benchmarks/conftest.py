"""The pytest-benchmark suite: ``pytest benchmarks/ --benchmark-only`` (a few minutes on 2 cores).

``test_ops.py`` times each op per backend (the plain-PyTorch reference is the baseline);
``test_entry_points.py`` times ``score_layer`` (per method), ``score_group``, ``prune`` and surgery on
the bundled pretrained ResNet-20 and the bundled CIFAR-10 slice, each beside the naive rerun of the
tests (``tests/naive.py``) in the same run, and checks carfast's answer against it before timing.

- images: the first ``CARFAST_BENCH_N`` (default 200) of the bundled slice: small real inputs.
- threads: ``CARFAST_BENCH_THREADS`` (default 1: one thread keeps timings steady on a shared 2-core
  machine, where two threads stall whenever another process is busy).
- JSON: every run writes ``benchmarks/results/pytest-benchmark.json`` (``--benchmark-json PATH`` for
  another file); pytest-benchmark prints the table, one group per comparison, fastest first.

The long scripts (``bench_*.py``) that produce ``RESULTS.md`` are run by hand; they are not collected.
"""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))       # the naive reference, tests/naive.py

collect_ignore_glob = ["bench_*.py"]


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    if getattr(config.option, "benchmark_json", "absent") is None:
        (HERE / "results").mkdir(exist_ok=True)
        config.option.benchmark_json = HERE / "results" / "pytest-benchmark.json"


@pytest.fixture(scope="session", autouse=True)
def threads():
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("CARFAST_BENCH_THREADS", "1")))
    yield torch.get_num_threads()
    torch.set_num_threads(before)


@functools.lru_cache(maxsize=None)
def cifar(n: int | None = None):
    import carfast
    return carfast.data.cifar10_test(n or int(os.environ.get("CARFAST_BENCH_N", "200")))


@functools.lru_cache(maxsize=None)
def resnet20():
    from carfast.models import cifar_resnet
    return cifar_resnet(20)
