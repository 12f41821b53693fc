"""``distmaml bench --workers --reduce``: a row per (config, reduce, workers) and the reduce cost, in JSON.

Not timed: the rows must exist, carry the contract's fields (docs/architecture.md:
``config``, ``reduce``, ``workers``, ``tasks_per_second``, ``outside_share``)
with sane values, and the reduce-cost rows must check their own sums.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distmaml.bench.engines import ENGINES, flat_size, parse_reduces, with_ratios
from distmaml.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_parse_reduces_names_the_allowed_engines():
    assert parse_reduces(" driver ,") == ["driver"]
    with pytest.raises(ConfigError, match=r"--reduce ring: allowed values are driver"):
        parse_reduces("ring")


def test_ratios_compare_each_reduce_with_its_own_one_worker_row():
    def row(reduce: str, w: int, tps: float) -> dict:
        return {"config": "c", "impl": f"{reduce} x{w}", "reduce": reduce, "workers": w, "tasks_per_second": tps}

    base = {"config": "c", "impl": "baseline", "threads": 2, "tasks_per_second": 10.0}
    rows = with_ratios(
        [base, row("driver", 1, 20.0), row("driver", 2, 30.0), row("other", 1, 40.0), row("other", 2, 80.0)]
    )
    assert [r.get("scaling_vs_1_worker") for r in rows] == [None, 1.0, 1.5, 1.0, 2.0]
    assert [r.get("vs_baseline_2_threads") for r in rows] == [None, 2.0, 3.0, 4.0, 8.0]


@pytest.mark.slow
def test_bench_rows_per_config_reduce_and_workers(tmp_path):
    out = tmp_path / "bench.json"
    reduces = ",".join(ENGINES)
    cmd = [sys.executable, "-m", "distmaml", "bench", "--configs", "sinusoid", "--workers", "1,2"]
    cmd += ["--reduce", reduces, "--steps", "2", "--reduce-params", "1000", "--json", str(out)]
    proc = subprocess.run(
        cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    engines = [r for r in report["rows"] if "reduce" in r]
    assert sorted((r["config"], r["reduce"], r["workers"]) for r in engines) == sorted(
        ("sinusoid", reduce, w) for reduce in ENGINES for w in (1, 2)
    )
    for r in engines:
        assert r["tasks_per_second"] > 0
        assert 0 <= r["outside_share"] < 1
        assert 0 < r["compute_seconds"] <= r["seconds_per_step"]
        assert f"sinusoid {r['reduce']} x{r['workers']}: " in proc.stdout
        # the scaling the shards' compute allows, one process without an engine: 1 worker's is its own ratio
        assert r["compute_bound"] == 1.0 if r["workers"] == 1 else r["compute_bound"] > 0
    assert proc.stdout.count("(the compute alone allows ") == len(engines)
    # what the machine gave two processes at once, just after the rows: the same figure on every row
    # (a timing: its value is the machine's, not asserted beyond being a rate)
    assert len({r["side_by_side"] for r in engines}) == 1 and 0 < engines[0]["side_by_side"] < float("inf")
    assert "sinusoid: right after its engine rows, two single-thread processes side by side got " in proc.stdout
    one = {r["reduce"]: r for r in engines if r["workers"] == 1}
    for r in engines:
        assert r["scaling_vs_1_worker"] == pytest.approx(r["tasks_per_second"] / one[r["reduce"]]["tasks_per_second"])
    costs = report["reduce_cost"]  # the --reduce-params gradient and the config's own, both ways
    assert sorted((r["gradient"], r["reduce"], r["workers"]) for r in costs) == [
        (g, r, w) for g in ("1,000", "sinusoid") for r in ("collective", "driver") for w in (1, 2)
    ]
    params = {r["gradient"]: r["params"] for r in costs}
    assert params == {"1,000": 1000, "sinusoid": flat_size("sinusoid")} and params["sinusoid"] > 1000
    assert all(r["seconds_per_step"] > 0 for r in costs)
    assert "reduce alone, per step" in proc.stdout
