#!/usr/bin/env bash
# The project's test command (README: "Run the tests"). Runs in an environment
# where `pip install -e '.[test]'` has been done.
#
# With no arguments: the quick tests (`-m "not slow"`), then the end-to-end runs (`-m slow`), each part in
# two pytest workers (pytest-xdist, one file per worker at a time, the longest files first), printing the 30
# slowest. With arguments: one pytest run with them (`ci/test.sh -m "not slow" -n 2`, `ci/test.sh
# tests/test_core.py`).
set -euo pipefail
cd "$(dirname "$0")/.."
ruff check distmaml tests cluster ci
mypy
python ci/config_doc.py --check
if [ $# -gt 0 ]; then
    order=()  # with -n and no --dist of the caller's: whole files per worker, the longest first (below)
    case " $* " in *" -n "*) case " $* " in *" --dist"*) ;; *) order=(--dist loadfile --no-loadscope-reorder) ;; esac ;; esac
    exec python -m pytest -q --durations=30 "${order[@]}" "$@"
fi
# The suite is CPU work (benchmarks/2026-12-04-suite-time.md): in one process it kept the 2 cores 68% busy
# (42 min); in two workers each part keeps them 93-94% busy. The quick part runs first: a broken change fails
# in minutes. Both parts run; the command fails if either does. Files go longest first by their measured time
# (tests/durations.json, tests/conftest.py); without --no-loadscope-reorder pytest-xdist would order them by
# their number of tests instead. One run of both parts took as long as the two (benchmarks/2026-12-05-suite-order.md).
status=0
python -m pytest -q -m "not slow" -n 2 --dist loadfile --no-loadscope-reorder --durations=10 || status=$?
python -m pytest -q -m slow -n 2 --dist loadfile --no-loadscope-reorder --durations=30 || status=$?
exit "$status"
