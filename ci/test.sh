#!/usr/bin/env bash
# The project's test command (README: "Run the tests"). Runs in an environment
# where `pip install -e '.[test]'` has been done.
set -euo pipefail
cd "$(dirname "$0")/.."
ruff check distmaml tests cluster
mypy
python -m pytest -q "$@"
