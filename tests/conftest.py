"""Test configuration: Triton in interpreter mode (harmless without Triton), 2 torch threads
(``CARFAST_TEST_THREADS=1``: one, beside another busy process), seeded, tests/ importable (naive.py,
nets.py), and the ``slow`` marker (skipped unless ``--runslow``)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")   # before anything imports triton

import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

torch.set_num_threads(int(os.environ.get("CARFAST_TEST_THREADS", "2")))
torch.manual_seed(0)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: slow test, run only with --runslow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: pass --runslow to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """One torch thread: tiny runs, where a second thread only adds barrier waits on a loaded 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
