#!/usr/bin/env bash
# The project's test command (README: "Run the tests"). Runs in an environment
# where `pip install -e '.[test]'` has been done. Extra arguments go to pytest
# (`ci/test.sh -m "not slow"` skips the end-to-end runs).
set -euo pipefail
cd "$(dirname "$0")/.."
ruff check distmaml tests cluster ci
mypy
python ci/config_doc.py --check
# Two pytest workers, a file each at a time (pytest-xdist; tests/conftest.py starts the longest files
# first); `ci/test.sh -n 0` runs in this one process.
python -m pytest -q -n 2 --dist loadfile --durations=30 "$@"
