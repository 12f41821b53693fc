"""The suite's order in pytest-xdist's workers: the longest files first, by their measured time
(tests/durations.json, written by ci/durations.py from pytest's ``--durations=0`` output)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import conftest
import pytest

ROOT = Path(__file__).resolve().parent.parent


def _durations_script():
    spec = importlib.util.spec_from_file_location("ci_durations", ROOT / "ci" / "durations.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Item:
    """What the ordering reads of a collected test: its node id and whether it is marked slow."""

    def __init__(self, nodeid: str, slow: bool = False) -> None:
        self.nodeid, self.slow = nodeid, slow

    def get_closest_marker(self, name: str):
        return object() if name == "slow" and self.slow else None


def test_files_run_longest_first_by_their_measured_seconds_of_the_parts_selected(monkeypatch):
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")
    monkeypatch.setattr(
        conftest,
        "FILE_SECONDS",
        {
            "tests/test_a.py": {"quick": 30.0, "slow": 0.0},
            "tests/test_b.py": {"quick": 1.0, "slow": 100.0},
            "tests/test_c.py": {"quick": 50.0, "slow": 0.0},
        },
    )
    items = [
        Item("tests/test_a.py::one"),
        Item("tests/test_a.py::two"),
        Item("tests/test_b.py::quick"),
        Item("tests/test_b.py::slow", slow=True),
        Item("tests/test_c.py::one"),
        Item("tests/test_new.py::slow", slow=True),  # not in the table: guessed as one end-to-end test
    ]
    conftest.pytest_collection_modifyitems(None, None, items)
    assert [i.nodeid for i in items] == [
        "tests/test_b.py::quick",  # 101 s, in its own order
        "tests/test_b.py::slow",
        "tests/test_c.py::one",  # 50
        "tests/test_a.py::one",  # 30
        "tests/test_a.py::two",
        "tests/test_new.py::slow",  # 20 (guessed)
    ]
    # with -m "not slow": test_b.py's quick second only
    quick = [i for i in items if not i.slow]
    conftest.pytest_collection_modifyitems(None, None, quick)
    assert [i.nodeid.split("::")[0] for i in quick] == [
        "tests/test_c.py",
        "tests/test_a.py",
        "tests/test_a.py",
        "tests/test_b.py",
    ]


def test_in_one_process_the_files_keep_their_order(monkeypatch):
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    items = [Item("tests/test_readme.py::x"), Item("tests/test_interrupt.py::y", slow=True)]
    conftest.pytest_collection_modifyitems(None, None, items)
    assert [i.nodeid for i in items] == ["tests/test_readme.py::x", "tests/test_interrupt.py::y"]


def test_the_table_is_read_from_pytest_durations_output(tmp_path, monkeypatch):
    durations = _durations_script()
    quick = tmp_path / "quick.log"
    quick.write_text(
        "============================= slowest durations =============================\n"
        "3.50s call     tests/test_a.py::test_x[1-batched]\n"
        "0.25s setup    tests/test_a.py::test_x[1-batched]\n"
        "1.00s teardown tests/test_b.py::TestC::test_y\n"
        "(12 durations < 0.005s hidden.  Use -vv to show these durations.)\n"
        "691 passed in 254.12s (0:04:14)\n"
    )
    slow = tmp_path / "slow.log"
    slow.write_text("40.00s call     tests/test_b.py::test_end_to_end\n")
    table = tmp_path / "durations.json"
    monkeypatch.setattr(durations, "TABLE", table)
    monkeypatch.setattr(durations, "ROOT", tmp_path)
    assert durations.main(["--logs", str(quick), str(slow)]) == 0
    assert json.loads(table.read_text()) == {
        "tests/test_a.py": {"quick": 3.8, "slow": 0.0},
        "tests/test_b.py": {"quick": 1.0, "slow": 40.0},
    }
    with pytest.raises(SystemExit, match="no '--durations=0' lines"):
        durations.main(["--logs", str(quick), str(tmp_path / "durations.json")])


def test_ci_runs_the_suite_in_the_measured_order_and_every_test_file_is_measured_or_guessed():
    script = (ROOT / "ci" / "test.sh").read_text()
    assert "--dist loadfile --no-loadscope-reorder" in script  # else xdist orders files by their number of tests
    known = set(conftest.FILE_SECONDS)
    files = {f"tests/{p.name}" for p in (ROOT / "tests").glob("test_*.py")}
    assert known <= files, f"tests/durations.json names files that are gone: {sorted(known - files)}"
    # the table's order with every file selected: the measured files first, heaviest first
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=ROOT,
        env={**os.environ, "PYTEST_XDIST_WORKER": "gw0"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-2000:]
    order = list(dict.fromkeys(line.split("::")[0] for line in proc.stdout.splitlines() if "::" in line))
    heaviest = max(known, key=lambda f: sum(conftest.FILE_SECONDS[f].values()))
    assert order[0] == heaviest
