#!/usr/bin/env bash
# Create .venv (once) with the pinned CPU build of torch and carfast installed in development mode,
# its C++ kernels compiled against that torch. Extra pip requirement specs may follow, e.g. '.[test]'.
# Usage: bash tools/setup_venv.sh [EXTRA_SPEC]    (PYTHON=python3.11 to choose the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
spec="${1:-.}"
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
# torch is pinned: an unpinned requirement would pull a multi-GB CUDA build; 2.13.0 is a CPU build.
# triton (pinned with it) runs carfast's Triton kernels on the CPU under TRITON_INTERPRET=1 for the tests.
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0 triton==3.7.1 "setuptools>=77" wheel numpy
.venv/bin/pip install -q --disable-pip-version-check --no-build-isolation -e "$spec"
.venv/bin/carfast --version
