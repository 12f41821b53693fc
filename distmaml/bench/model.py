"""``distmaml bench --algorithms ... --model resnet12``: what a big network's inner loop costs.

One row per algorithm, inner-step count and ``inner.recompute``: peak memory
and seconds per task of a meta-step on generated images of the
miniImageNet shape (84x84 RGB, 5 ways), one task at a time (batching
``loop_channels_last``, what a CPU worker runs: memory of one task's graph),
each row in a fresh process.

A task at the papers' shape (5-way 5-shot, 15 queries per class: 100
images) takes minutes and gigabytes per row on a CPU, so each row is measured
at a small shape (``--shots``, ``--queries``) and at one more shot and one
more query per class, in the same process after a warm-up; activation
memory and compute grow linearly with the images a task holds, so the three
points fix ``fixed + per support image x support images + per query image x
query images``, and that line gives the row's memory and time at
``--memory-at`` (default 5 shots, 15 queries). With ``inner.recompute`` the
peak is the larger of two phases (query backward, one rebuilt support step)
and a phase hidden at the small shape makes the line a lower bound. The
docs/algorithms.md ("what fits where") compares the fit with direct measurements.

Seconds per task are wall-clock and, beside them, the process's CPU time
(one thread): on a shared machine the CPU time is what a quiet core would
take, and the fit uses it. Peak memory is the rise of the RSS high-water mark over the RSS before the
meta-step (Linux), with glibc serving every allocation of 64 kB or more by its
own mapping (``bench.EXACT_RSS``), so it follows the live tensors; the
seconds include those mappings' page faults.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch

from distmaml.bench.measure import EXACT_RSS, in_subprocess, machine, malloc_trim, reset_peak_rss, status_kb
from distmaml.config import ALGORITHMS, ConfigError, load_config
from distmaml.storage import write_json

MODEL_BENCH: dict[str, list[str]] = {
    # miniImageNet shape: generated RGB 84x84 images, 5-way, the recipes' inner rate; one task per meta-step
    "resnet12": [
        "data.family=noise",
        "model.name=resnet12",
        "model.filters=64",
        "data.ways=5",
        "data.channels=3",
        "data.image_size=84",
        "inner.lr=0.01",
        "meta.batch_size=1",
        "batching=loop_channels_last",
        "workers=0",
        "device=cpu",
        "tracking.enabled=false",
    ],
}


def measure_points(config_dict: dict[str, Any], points: list[tuple[int, int]], threads: int) -> list[dict[str, Any]]:
    """Peak memory (MB) and seconds of one meta-step at each ``(shots, queries)`` point (run it in a fresh process).

    The meta-parameters and the network are built once; a warm-up meta-step
    at the first point initialises everything; before each measured step,
    freed memory is trimmed and the high-water mark reset.
    """
    from distmaml.config import config_from_dict
    from distmaml.core import meta_grad
    from distmaml.run.assembly import build_family, build_runner, init_meta_params

    torch.set_num_threads(threads)
    config = config_from_dict(config_dict)
    runner = build_runner(config, device="cpu")
    params = init_meta_params(config, runner.model)

    def batch(shots: int, queries: int) -> Any:
        shape = {**config_dict, "data": {**config_dict["data"], "shots": shots, "queries": queries}}
        family = build_family(config_from_dict(shape))
        return family.sample("train", 0, range(config.meta.batch_size)).to(dtype=runner.dtype)

    def step(tasks: Any) -> None:
        meta_grad(runner.model, params, tasks, runner.algorithm, batching=config.batching)

    step(batch(*points[0]))
    out = []
    for shots, queries in points:
        tasks = batch(shots, queries)
        malloc_trim()
        reset_peak_rss()
        rss0 = status_kb("VmRSS")
        t0, c0 = time.perf_counter(), time.process_time()
        step(tasks)
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
        peak_mb = max(0, status_kb("VmHWM") - rss0) / 1024
        del tasks
        out.append(
            {"shots": shots, "queries": queries, "peak_mb": peak_mb, "seconds": seconds, "cpu_seconds": cpu_seconds}
        )
    return out


def linear_fit(points: list[dict[str, Any]], key: str, ways: int, shots: int, queries: int) -> float:
    """``key`` at ``(shots, queries)`` from the line through the base point, +1 shot and +1 query."""
    base, more_shots, more_queries = points
    per_support = (more_shots[key] - base[key]) / ways
    per_query = (more_queries[key] - base[key]) / ways
    return float(
        base[key] + per_support * ways * (shots - base["shots"]) + per_query * ways * (queries - base["queries"])
    )


def measure_model(
    model: str,
    algorithms: list[str],
    inner_steps: list[int],
    recompute: bool,
    *,
    shots: int,
    queries: int,
    memory_at: tuple[int, int] | None,
    threads: int = 1,
    extra: tuple[str, ...] = (),
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """One row per algorithm x inner steps (x recompute), each in a fresh process.

    ``extra``: more config overrides (the tests make the network tiny with them);
    ``progress``: called with each row as it is measured.
    """
    points = [(shots, queries)]
    if memory_at:
        points += [(shots + 1, queries), (shots, queries + 1)]
    rows = []
    for algo in algorithms:
        for n in inner_steps:
            for rc in (False, True) if recompute else (False,):
                sets = [*MODEL_BENCH[model], f"algorithm={algo}", f"inner.steps={n}", f"inner.recompute={rc}", *extra]
                config = load_config("sinusoid", sets)
                measured = in_subprocess(measure_points, config.to_dict(), points, threads, env=EXACT_RSS)
                tasks, ways = config.meta.batch_size, config.data.ways
                row: dict[str, Any] = {
                    "model": model,
                    "algorithm": algo,
                    "inner_steps": n,
                    "recompute": rc,
                    "ways": ways,
                    "shots": shots,
                    "queries": queries,
                    "tasks": tasks,
                    "threads": threads,
                    "peak_mb": measured[0]["peak_mb"],
                    "seconds_per_task": measured[0]["seconds"] / tasks,
                    "cpu_seconds_per_task": measured[0]["cpu_seconds"] / tasks,
                    "points": measured,
                }
                if memory_at:
                    row["at"] = {"shots": memory_at[0], "queries": memory_at[1]}
                    row["at"]["peak_mb"] = linear_fit(measured, "peak_mb", ways, *memory_at)
                    row["at"]["cpu_seconds_per_task"] = linear_fit(measured, "cpu_seconds", ways, *memory_at) / tasks
                rows.append(row)
                if progress is not None:
                    progress(row)
    return rows


def model_table(rows: list[dict[str, Any]]) -> str:
    r0 = rows[0]
    at = r0.get("at")
    shape = f"{r0['ways']}w{r0['shots']}s{r0['queries']}q"
    head = f"{'model':<9} {'algorithm':<9} {'inner':>5} {'recompute':>9} {shape + ' MB':>12} {'s/task':>8} {'CPU s':>7}"
    if at:
        target = f"{r0['ways']}w{at['shots']}s{at['queries']}q"
        head += f" {target + ' MB (fit)':>19} {'CPU s (fit)':>11}"
    lines = [head, "-" * len(head)]
    for r in rows:
        line = (
            f"{r['model']:<9} {r['algorithm']:<9} {r['inner_steps']:>5} {('yes' if r['recompute'] else 'no'):>9} "
            f"{r['peak_mb']:>12.0f} {r['seconds_per_task']:>8.2f} {r['cpu_seconds_per_task']:>7.2f}"
        )
        if at:
            line += f" {r['at']['peak_mb']:>19.0f} {r['at']['cpu_seconds_per_task']:>11.1f}"
        lines.append(line)
    return "\n".join(lines)


def model_main(args: argparse.Namespace) -> int:
    """``distmaml bench --model NAME``: the algorithm rows on that network (``MODEL_BENCH``)."""
    if args.model not in MODEL_BENCH:
        raise ConfigError(f"--model {args.model}: allowed values are {', '.join(MODEL_BENCH)}")
    algorithms = [a.strip() for a in (args.algorithms or "maml,fomaml,anil").split(",") if a.strip()]
    unknown = [a for a in algorithms if a not in ALGORITHMS]
    if unknown:
        raise ConfigError(f"--algorithms {','.join(unknown)}: allowed values are {', '.join(ALGORITHMS)}")
    memory_at = None
    if args.memory_at:
        try:
            s, q = (int(v) for v in args.memory_at.split(","))
        except ValueError:
            raise ConfigError(f"--memory-at {args.memory_at}: expected SHOTS,QUERIES, e.g. 5,15") from None
        memory_at = (s, q)
    if args.shots < 1 or args.queries < 1:
        raise ConfigError(f"--shots {args.shots} --queries {args.queries}: both must be at least 1")
    extra = [f"model.filters={args.filters}", f"data.image_size={args.image_size}"]
    if args.tasks:
        extra.append(f"meta.batch_size={args.tasks}")
    rows = measure_model(
        args.model,
        algorithms,
        [int(n) for n in str(args.inner_steps).split(",")],
        args.recompute,
        shots=args.shots,
        queries=args.queries,
        memory_at=memory_at,
        extra=tuple(extra),
        progress=lambda r: print(
            f"{r['algorithm']}, {r['inner_steps']} inner step(s), recompute {r['recompute']}: "
            f"{r['peak_mb']:.0f} MB, {r['seconds_per_task']:.2f} s/task ({r['cpu_seconds_per_task']:.2f} CPU s)",
            flush=True,
        ),
    )
    print(model_table(rows))
    write_json(args.json, {"machine": machine(), "model_rows": rows})
    print(f"results written to {args.json}")
    return 0
