#!/usr/bin/env bash
# The project's test command (README: "Run the tests"). Runs in an environment
# where `pip install -e '.[test]'` has been done. Extra arguments go to pytest
# (`ci/test.sh -m "not slow"` skips the end-to-end runs).
set -euo pipefail
cd "$(dirname "$0")/.."
ruff check distmaml tests cluster ci
mypy
python ci/config_doc.py --check
python -m pytest -q --durations=30 "$@"
