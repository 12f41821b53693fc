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
import ctypes
import multiprocessing as mp
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

from distmaml.bench.engines import (
    RESNET12_PARAMS,
    engine_rows,
    engine_summary,
    flat_size,
    parse_reduces,
    reduce_cost,
    reduce_table,
)
from distmaml.checkpoint import write_json
from distmaml.config import Config, ConfigError, load_config
from distmaml.core.batching import BATCHINGS, candidates, describe_batching
from distmaml.environ import environ
from distmaml.typing import TaskBatch

K = TypeVar("K")

BENCH_CONFIGS: dict[str, list[str]] = {
    # MAML paper sinusoid: meta-batch 25, K=10, 1 inner step, MLP 1-40-40-1.
    "sinusoid": ["meta.batch_size=25", "data.shots=10", "data.queries=10", "inner.steps=1", "inner.lr=0.01"],
    # Omniglot shape: 5-way 1-shot, 15 queries per class, meta-batch 32, conv4-64 with batch-norm, 28x28.
    "omniglot": [
        "data.family=noise",
        "model.name=conv4",
        "model.filters=64",
        "data.ways=5",
        "data.shots=1",
        "data.queries=15",
        "data.image_size=28",
        "meta.batch_size=32",
        "inner.steps=1",
        "inner.lr=0.4",
    ],
}
DEFAULT_STEPS = {"sinusoid": 40, "omniglot": 5}


def bench_config(name: str, *extra: str) -> Config:
    return load_config("sinusoid", [*BENCH_CONFIGS[name], "tracking.enabled=false", *extra])


def _machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__}


# -- memory of this process (Linux) --------------------------------------------------
def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak_rss() -> None:
    """Resets VmHWM to the current RSS (Linux ``clear_refs`` 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _flops(fn: Any) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


# -- measurements, each in its own subprocess ----------------------------------------------
def _matmul_gflops(threads: int) -> float:
    torch.set_num_threads(threads)
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    reps, t0 = 10, time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def learn2learn_available() -> bool:
    """learn2learn is not a dependency; the bench adds its row where it is installed (docs/speed.md)."""
    import importlib.util

    return importlib.util.find_spec("learn2learn") is not None


def _learn2learn_step(model: torch.nn.Module, batch: TaskBatch, inner: Any) -> tuple[Any, torch.nn.Module]:
    """learn2learn's MAML as its users write it, around a twin of ``model`` with torch's batch-norm
    (same weights, same layer order: the fastest form of the same network for it)."""
    import learn2learn as l2l

    from distmaml.bench.baseline import native_twin
    from distmaml.core.losses import loss_fn

    twin = native_twin(model, classic_order=False)
    maml = l2l.algorithms.MAML(twin, lr=inner.lr, first_order=inner.first_order)
    lossf = loss_fn(inner.loss)

    def step() -> None:
        maml.zero_grad()
        for t in range(batch.num_tasks):
            learner = maml.clone()
            for _ in range(inner.steps):
                learner.adapt(lossf(learner(batch.support_x[t]), batch.support_y[t]))
            lossf(learner(batch.query_x[t]), batch.query_y[t]).backward()  # summed over tasks, as the core

    return step, twin


def learn2learn_agreement(name: str, batching: str, tasks: int = 3) -> float:
    """Largest difference between learn2learn's and the core's meta-gradient, in float64, relative
    to the largest gradient entry (run before learn2learn is timed)."""
    from distmaml.assembly import build_runner
    from distmaml.core import meta_grad

    config = bench_config(name, "workers=0", "precision=float64")
    runner = build_runner(config, device="cpu")
    batch = runner.family.sample("train", 0, range(tasks)).to(dtype=runner.dtype)
    params = {k: v.detach() for k, v in runner.model.named_parameters()}
    core = meta_grad(runner.model, params, batch, runner.inner, batching=batching).grads
    step, twin = _learn2learn_step(runner.model, batch, runner.inner)
    step()
    theirs = {k: v.grad for k, v in twin.named_parameters()}
    scale = max(float(v.abs().max()) for v in core.values())
    return max(float((core[k] - theirs[k]).abs().max()) for k in core) / scale  # type: ignore[operator]


def auto_batching(name: str, threads: int) -> dict[str, Any]:
    """What ``batching: auto`` picks for this config on this machine (a worker's start-up timing)."""
    from distmaml.assembly import build_runner

    torch.set_num_threads(threads)
    config = bench_config(name, "workers=0", "batching=auto")
    runner = build_runner(config, device="cpu")
    runner.choose_batching(config.meta.batch_size)
    return runner.batching_report()


def _step_fn(name: str, impl: str, batching: str) -> tuple[Config, Any]:
    """The config and a zero-argument function computing one meta-step's gradient with ``impl``
    (``core`` uses ``batching``; ``core-<batching>`` names its own)."""
    from distmaml.assembly import build_runner
    from distmaml.bench.baseline import baseline_meta_gradient, native_twin
    from distmaml.core import meta_grad

    config = bench_config(name, "workers=0")
    runner = build_runner(config, device="cpu")
    batch = runner.family.sample("train", 0, range(config.meta.batch_size)).to(dtype=runner.dtype)
    params: dict[str, Tensor] = dict(runner.model.named_parameters())
    inner = runner.inner
    if impl == "baseline":
        twin = native_twin(runner.model)

        def step() -> None:
            baseline_meta_gradient(
                twin, params, batch, lr=inner.lr, steps=inner.steps, first_order=inner.first_order, loss=inner.loss
            )

        return config, step
    if impl == "learn2learn":
        return config, _learn2learn_step(runner.model, batch, inner)[0]
    mode = batching if impl == "core" else impl.removeprefix("core-")

    def core_step() -> None:
        meta_grad(runner.model, params, batch, inner, batching=mode)

    return config, core_step


def interleaved_medians(fns: dict[K, Callable[[], Any]], rounds: int, min_seconds: float = 0.0) -> dict[K, float]:
    """Median seconds of each function, called in turn in one process: one untimed round (allocations,
    lazy initialisation), then at least ``rounds`` timed rounds, more until ``min_seconds`` have passed.

    Taking turns call by call exposes every function to the same conditions
    (other load on the machine, clock changes), so their ratio is fair even
    when absolute times drift.
    """
    for fn in fns.values():
        fn()
    times: dict[K, list[float]] = {key: [] for key in fns}
    end, done = time.perf_counter() + min_seconds, 0
    while done < rounds or time.perf_counter() < end:
        for key, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
        done += 1
    return {key: statistics.median(ts) for key, ts in times.items()}


def _time_interleaved(name: str, impls: list[str], batching: str, threads: int, steps: int) -> dict[str, float]:
    """Median seconds per meta-step of each implementation, timed in turn in one process."""
    torch.set_num_threads(threads)
    return interleaved_medians({impl: _step_fn(name, impl, batching)[1] for impl in impls}, steps)


def _measure(name: str, impl: str, batching: str, threads: int, steps: int) -> dict[str, Any]:
    """Peak memory and FLOPs of one implementation, alone in this process; seconds per step too."""
    torch.set_num_threads(threads)
    config, step = _step_fn(name, impl, batching)
    step()  # warm-up: allocations, lazy initialisation
    _reset_peak_rss()
    rss0 = _status_kb("VmRSS")
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - t0) / steps
    peak_mb = max(0, _status_kb("VmHWM") - rss0) / 1024
    flops = _flops(step)
    return {
        "config": name,
        "impl": impl,
        "threads": threads,
        "seconds_per_step": seconds,
        "tasks_per_second": config.meta.batch_size / seconds,
        "peak_mb": peak_mb,
        "gflops": flops / seconds / 1e9,
        "flops_per_step": flops,
    }


def _in_subprocess(fn: Any, *args: Any, env: dict[str, str] | None = None) -> Any:
    """``fn(*args)`` in a fresh process, with ``env`` added to its environment."""
    with environ(env or {}), mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


# For peak memory: glibc then serves every allocation of 64 kB or more with its own
# mmap and returns it on free, so the RSS follows the live tensors instead of what
# the allocator happens to keep cached (which made repeated peaks differ by 1.5x).
# Its timings are not reported (the interleaved run's are).
EXACT_RSS = {"MALLOC_MMAP_THRESHOLD_": "65536"}


# -- per algorithm: memory and time against inner steps ----------------------------------------
def _malloc_trim() -> None:
    """Returns freed heap memory to the OS (glibc), so the next peak starts from what is in use."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure_config(config_dict: dict[str, Any], threads: int, steps: int) -> dict[str, Any]:
    """Peak memory and seconds of a meta-step of any config's algorithm (run it in a fresh subprocess).

    A warm-up meta-step on one task initialises everything once; freed memory
    is then trimmed and the RSS high-water mark reset, so ``peak_mb`` is the
    rise of the first full meta-step over the RSS before it: its own working
    memory (with batching ``loop``, one task's graph at a time).
    """
    from distmaml.assembly import build_runner, init_meta_params
    from distmaml.config import config_from_dict
    from distmaml.core import meta_grad

    torch.set_num_threads(threads)
    config = config_from_dict(config_dict)
    runner = build_runner(config, device="cpu")
    batch = runner.family.sample("train", 0, range(config.meta.batch_size)).to(dtype=runner.dtype)
    params = init_meta_params(config, runner.model)

    def step(tasks: Any = batch) -> None:
        meta_grad(runner.model, params, tasks, runner.algorithm, batching=config.batching)

    step(batch.slice(0, 1))
    _malloc_trim()
    _reset_peak_rss()
    rss0 = _status_kb("VmRSS")
    t0 = time.perf_counter()
    step()
    peak_mb = max(0, _status_kb("VmHWM") - rss0) / 1024
    for _ in range(steps - 1):
        step()
    seconds = (time.perf_counter() - t0) / steps
    return {
        "algorithm": config.algorithm,
        "inner_steps": config.inner.steps,
        "recompute": config.inner.recompute,
        "tasks": config.meta.batch_size,
        "threads": threads,
        "seconds_per_step": seconds,
        "tasks_per_second": config.meta.batch_size / seconds,
        "peak_mb": peak_mb,
    }


def measure_algorithms(
    name: str, algorithms: list[str], inner_steps: list[int], recompute: bool, steps: int, tasks: int = 0
) -> list[dict[str, Any]]:
    """One row per algorithm and inner-step count (and per ``inner.recompute`` if asked), each in a subprocess."""
    rows = []
    for algo in algorithms:
        for n in inner_steps:
            for rc in (False, True) if recompute else (False,):
                extra = [f"algorithm={algo}", f"inner.steps={n}", f"inner.recompute={rc}", "workers=0", "device=cpu"]
                if tasks:
                    extra.append(f"meta.batch_size={tasks}")
                row = _in_subprocess(measure_config, bench_config(name, *extra).to_dict(), 1, steps)
                row["config"] = name
                rows.append(row)
    for r in rows:  # memory relative to the same algorithm's first inner-step count, without recompute
        ref = next(x for x in rows if x["algorithm"] == r["algorithm"] and not x["recompute"])
        r["memory_vs_fewest_steps"] = r["peak_mb"] / ref["peak_mb"] if ref["peak_mb"] else None
    return rows


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
    from distmaml.assembly import build_network

    matmul = {t: _in_subprocess(_matmul_gflops, t) for t in sorted(set(threads) | ({2} if workers else set()))}
    rows: list[dict[str, Any]] = []
    auto: dict[str, dict[int, dict[str, Any]]] = {}
    agreement: dict[str, float] = {}
    with_l2l = learn2learn_available()
    for name in configs:
        n = steps or DEFAULT_STEPS[name]
        batch_size = bench_config(name).meta.batch_size
        usable = candidates(build_network(bench_config(name)))
        for t in threads:
            auto.setdefault(name, {})[t] = choice = _in_subprocess(auto_batching, name, t)
            batching = choice["choice"]
            impls_t = ["baseline", *(i for i in impls if i == "core" or i.removeprefix("core-") in usable)]
            if with_l2l:
                if name not in agreement:
                    agreement[name] = _in_subprocess(learn2learn_agreement, name, batching)
                    if agreement[name] > 1e-10:
                        raise RuntimeError(
                            f"{name}: learn2learn's meta-gradient differs from the core's by {agreement[name]:.2e} "
                            "(relative, float64): not the same function, so no timing"
                        )
                impls_t.append("learn2learn")
            measured = [_in_subprocess(_measure, name, impl, batching, t, 1, env=EXACT_RSS) for impl in impls_t]
            seconds = _in_subprocess(_time_interleaved, name, impls_t, batching, t, n)
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
        "machine": _machine(),
        "matmul_gflops": matmul,
        "rows": rows,
        "auto_batching": auto,
        "learn2learn_agreement": agreement,
    }
    if workers:
        sizes = {"12M": reduce_params} if reduce_params == RESNET12_PARAMS else {f"{reduce_params:,}": reduce_params}
        sizes = {**(sizes if reduce_params else {}), **{name: flat_size(name) for name in configs}}
        report["reduce_cost"] = _in_subprocess(reduce_cost, workers, sizes)
    if "omniglot" in configs:
        report["sampler"] = sampler_row(rows)
    return report


def sampler_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The task store's episode sampler on one thread (Omniglot-sized store, 5-way 1-shot, 15 queries),
    beside the rate at which one single-thread worker consumes those tasks (the core's row)."""
    from distmaml.bench.data import sampler_tasks_per_second

    out: dict[str, Any] = _in_subprocess(sampler_tasks_per_second)
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
    write_json(args.json, {"machine": _machine(), "algorithms": rows})
    print(f"results written to {args.json}")
    return 0
