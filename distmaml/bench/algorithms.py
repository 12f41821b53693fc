"""The algorithm table: each algorithm after a short run against no adaptation.

``python -m distmaml.bench.algorithms --config sinusoid --steps 500 --out runs/table``
trains every algorithm of the family on one recipe (``distmaml train
--workers 0``, one after another, each in its own process), then prints for
each: the meta-test metric after adaptation and without it (the same
meta-learned initialisation, the same held-out tasks, zero inner steps), both
with 95% intervals; seconds per meta-step of the run; and the peak memory of
one meta-step, measured apart in a fresh process (``distmaml.bench``).
Writes the rows to ``OUT/table.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from distmaml.config import ALGORITHMS, load_config
from distmaml.run.results import describe
from distmaml.storage import write_json


def run_one(config: str, algorithm: str, steps: int, out: Path, extra: list[str]) -> dict[str, Any]:
    """Trains one algorithm; returns its table row."""
    from distmaml.bench.measure import in_subprocess, measure_config

    sets = [f"algorithm={algorithm}", f"meta.steps={steps}", "meta.val_every=0", "tracking.enabled=false", *extra]
    run_dir = out / f"{Path(config).stem}-{algorithm}"
    cmd = [sys.executable, "-m", "distmaml", "train", "--config", config, "--workers", "0", "--quiet"]
    cmd += [a for s in sets for a in ("--set", s)] + ["--out", str(run_dir)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    result = json.loads((run_dir / "result.json").read_text())
    cfg = load_config(config, [*sets, "workers=0", "device=cpu"])
    memory = in_subprocess(measure_config, cfg.to_dict(), 1, 1)
    return {
        "config": Path(config).stem,
        "algorithm": algorithm,
        "steps": steps,
        "test_steps": cfg.inner.test_steps,
        "meta_test": result["meta_test"],
        "unadapted": result["meta_test_unadapted"],
        "seconds_per_step": cfg.meta.batch_size / result["tasks_per_second"],
        "peak_mb": memory["peak_mb"],
        "run_dir": str(run_dir),
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| recipe | algorithm | steps | test steps | meta-test (95% interval) | no adaptation | s/meta-step | peak MB |"
    )
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['algorithm']} | {r['steps']} | {r['test_steps']} | {describe(r['meta_test'])} | "
            f"{describe(r['unadapted'])} | {r['seconds_per_step']:.3f} | {r['peak_mb']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distmaml.bench.algorithms", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="sinusoid", help="recipe name or YAML path (default: sinusoid)")
    parser.add_argument("--steps", type=int, default=500, help="meta-steps per run (default: 500)")
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS), help="comma-separated (default: all)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    parser.add_argument("--out", required=True, help="folder for the runs and table.json")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for algorithm in [a.strip() for a in args.algorithms.split(",") if a.strip()]:
        rows.append(run_one(args.config, algorithm, args.steps, out, args.set))
        print(format_table(rows[-1:]).splitlines()[-1], flush=True)
        write_json(out / "table.json", rows)
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
