#!/usr/bin/env bash
# The project's test command (README: "Run the tests"). Runs in an environment
# where `pip install -e '.[test]'` has been done.
#
# With no arguments: the quick tests (`-m "not slow"`), then the end-to-end
# runs (`-m slow`), each part in two pytest workers (pytest-xdist, one file per
# worker at a time), printing the 30 slowest. With arguments: one pytest run
# with them (`ci/test.sh -m "not slow" -n 2`, `ci/test.sh tests/test_core.py`).
set -euo pipefail
cd "$(dirname "$0")/.."
ruff check distmaml tests cluster ci
mypy
python ci/config_doc.py --check
if [ $# -gt 0 ]; then
    exec python -m pytest -q --durations=30 "$@"
fi
# The suite is CPU work (benchmarks/2026-12-04-suite-time.md): in one process it kept the 2 cores 68% busy
# (42 min); in two workers each part keeps them 93-94% busy (quick: 355 s instead of 511 s; end-to-end:
# 25 min instead of 34). The quick part runs first: a broken change fails in minutes. Both parts run; the
# command fails if either does.
status=0
python -m pytest -q -m "not slow" -n 2 --dist loadfile --durations=10 || status=$?
python -m pytest -q -m slow -n 2 --dist loadfile --durations=30 || status=$?
exit "$status"
