#!/usr/bin/env bash
# Set up .venv with the test extras, check the code with ruff (pyproject.toml) and run the test suite.
# CI (.ci/run) runs exactly this. CARFAST_REQUIRE_EXT=1 makes a missing or broken C++ extension a test
# failure, not a skip.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_venv.sh '.[test]'
.venv/bin/ruff check .
CARFAST_REQUIRE_EXT=1 .venv/bin/python -m pytest -q "$@"
