"""Writes tests/durations.json: the seconds each test file takes, its quick tests and its end-to-end (slow)
ones apart, which tests/conftest.py uses to start the longest files first in pytest-xdist's workers.

    python ci/durations.py                       # runs both parts in 2 workers (about 25 minutes), then writes
    python ci/durations.py --logs QUICK SLOW     # from the output of earlier runs with --durations=0

A part's seconds are the sum of its tests' setup, call and teardown times as pytest reports them with
``--durations=0`` (times measured beside the other worker, as in CI). Refresh it when files are added or
a file's time changes much; a file the table lacks is guessed (tests/conftest.py, GUESS_SECONDS).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TABLE = ROOT / "tests" / "durations.json"
LINE = re.compile(r"^\s*([0-9.]+)s (?:setup|call|teardown)\s+(tests/[^:\s]+\.py)::")
PARTS = {"quick": "not slow", "slow": "slow"}


def file_seconds(text: str) -> dict[str, float]:
    """Per file, the sum of the durations pytest printed (``--durations=0``)."""
    seconds: dict[str, float] = defaultdict(float)
    for line in text.splitlines():
        m = LINE.match(line)
        if m:
            seconds[m.group(2)] += float(m.group(1))
    return dict(seconds)


def run_part(marker: str) -> str:
    """One part as ``ci/test.sh`` runs it (its workers and order), with every test's duration printed."""
    cmd = ["bash", "ci/test.sh", "-m", marker, "-n", "2", "--durations=0", "-p", "no:cacheprovider"]
    print("running:", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed (exit {proc.returncode}); the table is unchanged:\n{proc.stdout[-3000:]}")
    return proc.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logs", nargs=2, metavar=("QUICK", "SLOW"), help="outputs of earlier runs of each part")
    args = parser.parse_args(argv)
    if args.logs:
        texts = [Path(p).read_text() for p in args.logs]
    else:
        texts = [run_part(marker) for marker in PARTS.values()]
    measured = {part: file_seconds(text) for part, text in zip(PARTS, texts)}
    if not all(measured.values()):
        sys.exit("no '--durations=0' lines found in a part's output: run pytest with --durations=0")
    files = sorted(set().union(*measured.values()))
    table = {f: {part: round(measured[part].get(f, 0.0), 1) for part in PARTS} for f in files}
    TABLE.write_text(json.dumps(table, indent=1) + "\n")
    total = {part: round(sum(s.values())) for part, s in measured.items()}
    print(f"{TABLE.relative_to(ROOT)}: {len(files)} files; seconds of tests: {total}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
