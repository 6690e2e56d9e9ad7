"""The README's integration examples run as a user would run them (small settings)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


def _run(script: str, *args: str) -> str:
    run = subprocess.run([sys.executable, os.path.join(EXAMPLES, script), *args], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def test_score_group_example():
    out = _run("score_group.py", "--images", "64", "--layer", "layer2.1.conv2")
    assert "CAR scores of 'layer2.1.conv2': 32 filters on 64 images" in out
    assert "shortcut_out  layer2.0.shortcut" in out and "removed channels" in out


def test_masks_example():
    out = _run("masks.py", "--images", "64")
    gap = float(out.rsplit("masked vs physically pruned:", 1)[1])
    assert gap < 1e-4


def test_torch_pruning_example():
    pytest.importorskip("torch_pruning", reason="Torch-Pruning is not installed (pip install '.[test]')")
    out = _run("torch_pruning_car.py", "--images", "48", "--steps", "1", "--ratio", "0.1")
    assert "step 1: 1." in out and "fewer MACs, held-out accuracy" in out
