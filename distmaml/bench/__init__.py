"""``distmaml bench``: time a meta-step, compare implementations and worker counts.

Every figure is measured in the same run and reported as a ratio against a
reference measured beside it: the core against the classic per-task baseline
(``distmaml.bench.baseline``) and, where it is installed, against learn2learn's
``MAML`` wrapped around the same network; W workers against 1. Each
single-process measurement runs in a fresh subprocess with its own thread
count, so peak memory (the RSS high-water mark above the process's RSS before
the timed steps) is its own.

The core's row uses the batching that ``batching: auto`` picks on this
machine (timed once, in its own subprocess, as a worker does at start-up);
``--batchings`` adds a row per candidate. Before learn2learn is timed, its
meta-gradient is checked against the core's in float64.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from distmaml.bench.engines import (
    RESNET12_PARAMS,
    engine_rows,
    engine_summary,
    flat_size,
    parse_reduces,
    reduce_cost,
    reduce_table,
)
from distmaml.bench.measure import (
    BENCH_CONFIGS,
    DEFAULT_STEPS,
    EXACT_RSS,
    auto_batching,
    bench_config,
    in_subprocess,
    learn2learn_agreement,
    learn2learn_available,
    machine,
    matmul_gflops,
    measure_algorithms,
    measure_one,
    time_interleaved,
)
from distmaml.config import ConfigError
from distmaml.core.batching import BATCHINGS, candidates, describe_batching
from distmaml.storage import write_json


def algorithm_table(rows: list[dict[str, Any]]) -> str:
    head = f"{'config':<9} {'algorithm':<9} {'inner':>5} {'recompute':>9} {'s/step':>9} {'tasks/s':>8} {'peak MB':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['config']:<9} {r['algorithm']:<9} {r['inner_steps']:>5} {('yes' if r['recompute'] else 'no'):>9} "
            f"{r['seconds_per_step']:>9.4f} {r['tasks_per_second']:>8.1f} {r['peak_mb']:>8.1f}"
        )
    return "\n".join(lines)


# -- report ---------------------------------------------------------------------------
def _table(rows: list[dict[str, Any]], matmul: dict[int, float]) -> str:
    head = (
        f"{'config':<9} {'implementation':<26} {'thr/wk':>6} {'s/step':>9} {'tasks/s':>9} {'vs base':>8} "
        f"{'vs l2l':>7} {'peak MB':>8} {'mem/l2l':>7} {'GFLOP/s':>8} {'% matmul':>8} {'outside':>8}"
    )
    lines = [head, "-" * len(head)]

    def ratio(x: float | None, width: int) -> str:
        return f"{(f'{x:.2f}x' if x else '-'):>{width}}"

    for r in rows:
        peak = r.get("peak_mb")
        gf = r.get("gflops")
        pct = 100 * gf / matmul[r["threads"]] if gf is not None and r["threads"] in matmul else None
        out = r.get("outside_share")
        impl = f"core ({r['batching']})" if r["impl"] == "core" else r["impl"]
        lines.append(
            f"{r['config']:<9} {impl:<26} {r.get('workers', r['threads']):>6} {r['seconds_per_step']:>9.4f} "
            f"{r['tasks_per_second']:>9.1f} {ratio(r.get('vs_baseline'), 8)} {ratio(r.get('vs_learn2learn'), 7)} "
            f"{(f'{peak:.1f}' if peak is not None else '-'):>8} {ratio(r.get('memory_vs_learn2learn'), 7)} "
            f"{(f'{gf:.2f}' if gf is not None else '-'):>8} "
            f"{(f'{pct:.0f}%' if pct is not None else '-'):>8} {(f'{100 * out:.1f}%' if out is not None else '-'):>8}"
        )
    return "\n".join(lines)


def run(
    configs: list[str],
    threads: list[int],
    steps: int,
    impls: list[str],
    workers: list[int],
    engine_steps: int,
    reduces: Sequence[str] = ("driver",),
    reduce_params: int = RESNET12_PARAMS,
    engine_sets: Sequence[str] = (),
) -> dict[str, Any]:
    """``impls``: ``core`` and any ``core-<batching>`` (kept where a candidate for the config's model);
    the baseline, and learn2learn where installed, are added. With ``workers``: a row per engine
    (``reduces``) and worker count, and the reduce cost of a flat gradient of ``reduce_params``
    entries (0: none) and of each config's own."""
    from distmaml.run.assembly import build_network

    matmul = {t: in_subprocess(matmul_gflops, t) for t in sorted(set(threads) | ({2} if workers else set()))}
    rows: list[dict[str, Any]] = []
    auto: dict[str, dict[int, dict[str, Any]]] = {}
    agreement: dict[str, float] = {}
    with_l2l = learn2learn_available()
    for name in configs:
        n = steps or DEFAULT_STEPS[name]
        batch_size = bench_config(name).meta.batch_size
        usable = candidates(build_network(bench_config(name)))
        for t in threads:
            auto.setdefault(name, {})[t] = choice = in_subprocess(auto_batching, name, t)
            batching = choice["choice"]
            impls_t = ["baseline", *(i for i in impls if i == "core" or i.removeprefix("core-") in usable)]
            if with_l2l:
                if name not in agreement:
                    agreement[name] = in_subprocess(learn2learn_agreement, name, batching)
                    if agreement[name] > 1e-10:
                        raise RuntimeError(
                            f"{name}: learn2learn's meta-gradient differs from the core's by {agreement[name]:.2e} "
                            "(relative, float64): not the same function, so no timing"
                        )
                impls_t.append("learn2learn")
            measured = [in_subprocess(measure_one, name, impl, batching, t, 1, env=EXACT_RSS) for impl in impls_t]
            seconds = in_subprocess(time_interleaved, name, impls_t, batching, t, n)
            for r in measured:
                r["gflops"] *= r["seconds_per_step"] / seconds[r["impl"]]
                r["seconds_per_step"] = seconds[r["impl"]]
                r["tasks_per_second"] = batch_size / seconds[r["impl"]]
                if r["impl"].startswith("core"):
                    r["batching"] = batching if r["impl"] == "core" else r["impl"].removeprefix("core-")
            base = measured[0]
            l2l = next((r for r in measured if r["impl"] == "learn2learn"), None)
            for r in measured:
                r["vs_baseline"] = r["tasks_per_second"] / base["tasks_per_second"]
                r["memory_vs_baseline"] = r["peak_mb"] / base["peak_mb"] if base["peak_mb"] else None
                if l2l is not None:
                    r["vs_learn2learn"] = r["tasks_per_second"] / l2l["tasks_per_second"]
                    # below 1 MB the RSS high-water mark (kB pages) is noise: no ratio
                    r["memory_vs_learn2learn"] = r["peak_mb"] / l2l["peak_mb"] if l2l["peak_mb"] >= 1 else None
            rows += measured
        if workers:
            rows += engine_rows(name, workers, reduces, engine_steps or n, engine_sets)
    report: dict[str, Any] = {
        "machine": machine(),
        "matmul_gflops": matmul,
        "rows": rows,
        "auto_batching": auto,
        "learn2learn_agreement": agreement,
    }
    if workers:
        sizes = {"12M": reduce_params} if reduce_params == RESNET12_PARAMS else {f"{reduce_params:,}": reduce_params}
        sizes = {**(sizes if reduce_params else {}), **{name: flat_size(name) for name in configs}}
        report["reduce_cost"] = in_subprocess(reduce_cost, workers, sizes)
    if "omniglot" in configs:
        report["sampler"] = sampler_row(rows)
    return report


def sampler_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The task store's episode sampler on one thread (Omniglot-sized store, 5-way 1-shot, 15 queries),
    beside the rate at which one single-thread worker consumes those tasks (the core's row)."""
    from distmaml.bench.data import sampler_tasks_per_second

    out: dict[str, Any] = in_subprocess(sampler_tasks_per_second)
    core = next((r for r in rows if r["config"] == "omniglot" and r["impl"] == "core" and r["threads"] == 1), None)
    out["vs_worker"] = out["tasks_per_second"] / core["tasks_per_second"] if core else None
    return out


def main(args: argparse.Namespace) -> int:
    if getattr(args, "model", ""):
        from distmaml.bench.model import model_main

        return model_main(args)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in BENCH_CONFIGS]
    if unknown:
        raise ConfigError(f"--configs {','.join(unknown)}: allowed values are {', '.join(BENCH_CONFIGS)}")
    if getattr(args, "algorithms", ""):
        return algorithms_main(args, configs)
    threads = [int(t) for t in str(args.threads).split(",")]
    workers = [int(w) for w in str(args.workers).split(",")] if args.workers else []
    impls = ["core"] + ([f"core-{b}" for b in BATCHINGS] if args.batchings else [])
    reduces = parse_reduces(args.reduce)
    sets = list(getattr(args, "engine_set", None) or [])
    if sets:
        bench_config(configs[0], *sets)  # a wrong override is said now, not after the core's rows
    report = run(configs, threads, args.steps, impls, workers, args.engine_steps, reduces, args.reduce_params, sets)
    for name, per_thread in report["auto_batching"].items():
        for t, choice in per_thread.items():
            print(f"{name}, {t} thread(s): {describe_batching(choice)}")
    for name, diff in report["learn2learn_agreement"].items():
        print(
            f"{name}: learn2learn's meta-gradient equals the core's in float64 (largest difference {diff:.1e} relative)"
        )
    if not learn2learn_available():
        print("learn2learn is not installed: no learn2learn row (docs/speed.md)")
    print(_table(report["rows"], report["matmul_gflops"]))
    print(f"matmul rate: {', '.join(f'{v:.1f} GFLOP/s at {k} thread(s)' for k, v in report['matmul_gflops'].items())}")
    if sets:
        print(f"engine rows with {' '.join(sets)}")
    for line in engine_summary(report["rows"]):
        print(line)
    if "reduce_cost" in report:
        print("reduce alone, per step (workers compute nothing):")
        print(reduce_table(report["reduce_cost"]))
    if "sampler" in report:
        s = report["sampler"]
        ratio = f", {s['vs_worker']:.0f}x the rate one worker consumes them" if s["vs_worker"] else ""
        print(
            f"omniglot sampler: {s['tasks_per_second']:.0f} tasks/s on 1 thread{ratio} "
            f"(store of {s['train_images']} meta-train images loaded in {s['load_seconds']:.2f} s)"
        )
    write_json(args.json, report)
    print(f"results written to {args.json}")
    return 0


def algorithms_main(args: argparse.Namespace, configs: list[str]) -> int:
    """``distmaml bench --algorithms ...``: the per-algorithm table instead of the implementation comparison."""
    from distmaml.config import ALGORITHMS

    algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    unknown = [a for a in algorithms if a not in ALGORITHMS]
    if unknown:
        raise ConfigError(f"--algorithms {','.join(unknown)}: allowed values are {', '.join(ALGORITHMS)}")
    inner_steps = [int(n) for n in str(args.inner_steps).split(",")]
    rows: list[dict[str, Any]] = []
    for name in configs:
        n = args.steps or DEFAULT_STEPS[name]
        rows += measure_algorithms(name, algorithms, inner_steps, args.recompute, n, args.tasks)
    print(algorithm_table(rows))
    write_json(args.json, {"machine": machine(), "algorithms": rows})
    print(f"results written to {args.json}")
    return 0
