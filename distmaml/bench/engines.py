"""``distmaml bench --workers``: tasks/s per engine and worker count, and what one reduce costs.

Two engines add the workers' summed meta-gradients (``engine.reduce``):
``driver`` (worker actors return their sums through the object store; the
driver adds them, steps and puts the parameters back) and ``collective``
(the workers all-reduce among themselves). For each config, reduce and worker
count a row gives tasks/s and ``outside_share``, the share of a step's wall
time outside the workers' compute; each reduce's rows are compared with its
own 1-worker row, measured in the same run.

Beside them, ``reduce_cost`` times the reduce alone for a 12M-parameter flat
float32 gradient (ResNet-12's size), workers computing nothing: ``driver`` is
the Ray engine's own ``meta_batch`` (the parameters sent, every
actor returning a ready gradient, the driver summing them); ``collective`` is
the sum among W processes a collective group takes (shared memory on one
node, else one gloo ``all_reduce``).
"""

from __future__ import annotations

import functools
import logging
import math
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor

from distmaml.engine.protocol import EvalShard, GradShard
from distmaml.engine.shm import GroupSum
from distmaml.run.runner import TaskRunner

RESNET12_PARAMS = 12_000_000
"""Entries of the flat gradient ``reduce_cost`` moves (ResNet-12 for miniImageNet: about 12M parameters)."""
REDUCE_STEPS = 10
"""Timed reduces per engine and worker count (after one untimed)."""
COLLECTIVE_SECONDS = 4.0
"""The collective rows time at least as many steps as one process computes the whole meta-batch in
this long (``compute_bound``'s ``batch_seconds``): over a window of a fraction of a second, one burst
of Ray's own work (its controller, new idle workers after a group ends) decided a row."""
COLLECTIVE_MAX_STEPS = 10_000


# -- the reduce alone: a 12M-parameter gradient, and each config's own ----------------------------
class ReadyGradient:
    """Stands in for a ``TaskRunner`` in the Ray engine's worker actors: its "meta-gradient" is a ready
    flat tensor as long as the parameters it is sent, so a step of the engine is its reduce alone."""

    device = torch.device("cpu")
    batching = "ready"

    def __init__(self) -> None:
        self.grads: dict[int, Tensor] = {}

    def choose_batching(self, tasks: int) -> str:
        return self.batching

    def batching_report(self) -> dict[str, Any]:
        return {"choice": self.batching, "seconds": {}}

    def batching_line(self) -> str:
        return "a ready gradient (reduce-cost benchmark)"

    def meta_grad(self, flat: Tensor, step: int, ids: range) -> GradShard:
        n = flat.numel()
        if n not in self.grads:
            self.grads[n] = torch.ones(n)
        return GradShard(self.grads[n], 0.0, 0.0, len(ids))

    def evaluate(self, flat: Tensor, split: str, ids: range, steps: int) -> EvalShard:
        raise NotImplementedError("the reduce-cost benchmark only takes meta-steps")


class AllReduceProbe:
    """One of W processes of a gloo group, holding flat float32 gradients, which it sums as a
    collective group's worker does (``GroupEngine``: through shared memory on one node, else gloo)."""

    def __init__(self, rank: int, world: int) -> None:
        torch.set_num_threads(1)
        self.rank, self.world = rank, world
        self.grads: dict[int, Tensor] = {}
        self.sums: dict[int, GroupSum] = {}

    def join(self, init_method: str) -> None:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=init_method, rank=self.rank, world_size=self.world)

    def all_reduce(self, numel: int) -> float:
        """Seconds of one ``all_reduce(SUM)`` of ``numel`` entries, started once every rank is there (after
        a barrier)."""
        import torch.distributed as dist

        grad = self.grads.setdefault(numel, torch.empty(numel))
        if numel not in self.sums:
            self.sums[numel] = GroupSum(self.rank, self.world, numel, grad.dtype, grad.device)
        grad.fill_(1.0)  # the sum grows every call: start from the same values
        dist.barrier()
        t0 = time.perf_counter()
        self.sums[numel](grad)
        seconds = time.perf_counter() - t0
        if float(grad[0]) != self.world:
            raise RuntimeError(f"all_reduce gave {float(grad[0])}, not {self.world}")
        return seconds


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def flat_size(name: str) -> int:
    """Entries of a bench config's flat meta-parameters (what its engines reduce every step)."""
    from distmaml.bench.measure import bench_config
    from distmaml.core.algorithm import init_algorithm_params
    from distmaml.run.assembly import build_algorithm, build_network

    config = bench_config(name)
    return sum(p.numel() for p in init_algorithm_params(build_network(config), build_algorithm(config)).values())


def reduce_cost(workers: list[int], sizes: dict[str, int], steps: int = REDUCE_STEPS) -> list[dict[str, Any]]:
    """Seconds per step to reduce a flat float32 gradient from W workers that compute nothing, both ways,
    for each of ``sizes`` (a label, e.g. ``12M`` or a config's name: entries).

    One Ray engine (with ``ReadyGradient`` workers) and one gloo group per
    worker count are started up front; then, round by round, each takes a
    reduce of each size in turn, so all share the machine's conditions.
    ``driver``: the driver's wall time of ``RayEngine.meta_batch`` (the parameters
    sent by ``params_arg``, every actor returning its gradient, the sum).
    ``collective``: the slowest rank's ``all_reduce``. Reported: medians over
    ``steps`` rounds after one untimed.
    """
    import ray

    from distmaml.bench.measure import bench_config
    from distmaml.engine.ray_engine import RayEngine

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2 * sum(workers) + 1, include_dashboard=False, logging_level=logging.WARNING)
    probe = ray.remote(num_cpus=1)(AllReduceProbe)
    engines: dict[int, RayEngine] = {}
    groups: dict[int, list[Any]] = {}
    times: dict[tuple[str, str, int], list[float]] = {}
    try:
        for w in workers:
            config = bench_config("sinusoid", f"workers={w}", "engine.cpus_per_worker=1", "engine.driver_cpus=0.01")
            engines[w] = RayEngine(config, cast("Callable[[], TaskRunner]", ReadyGradient))
            groups[w] = [probe.remote(r, w) for r in range(w)]  # type: ignore[attr-defined]
            init = f"tcp://127.0.0.1:{_free_port()}"
            ray.get([p.join.remote(init) for p in groups[w]])
        flats = {label: torch.zeros(n) for label, n in sizes.items()}
        for i in range(steps + 1):
            for label, flat in flats.items():
                for w in workers:
                    t0 = time.perf_counter()
                    shard = engines[w].meta_batch(flat, i, w)
                    seconds = time.perf_counter() - t0
                    if float(shard.grad[0]) != w:
                        raise RuntimeError(f"the driver's sum gave {float(shard.grad[0])}, not {w}")
                    reduce = max(ray.get([p.all_reduce.remote(flat.numel()) for p in groups[w]]))
                    if i:
                        times.setdefault((label, "driver", w), []).append(seconds)
                        times.setdefault((label, "collective", w), []).append(reduce)
    finally:
        for e in engines.values():
            e.close()
        for g in groups.values():
            for p in g:
                ray.kill(p)
        if started:
            ray.shutdown()
    return [
        {
            "gradient": label,
            "reduce": reduce,
            "workers": w,
            "params": sizes[label],
            "megabytes": sizes[label] * 4 / 1e6,
            "seconds_per_step": statistics.median(ts),
        }
        for (label, reduce, w), ts in sorted(
            times.items(), key=lambda kv: (list(sizes).index(kv[0][0]), kv[0][1] != "driver", kv[0][2])
        )
    ]


def reduce_table(rows: list[dict[str, Any]]) -> str:
    head = f"{'gradient':<9} {'reduce':<11} {'workers':>7} {'params':>11} {'MB each':>8} {'ms/step':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['gradient']:<9} {r['reduce']:<11} {r['workers']:>7} {r['params']:>11,} {r['megabytes']:>8.2f} "
            f"{1000 * r['seconds_per_step']:>9.1f}"
        )
    return "\n".join(lines)


# -- the engines: tasks/s per reduce and worker count ------------------------------------------
def _engine_row(
    name: str, reduce: str, workers: int, tasks: int, step: float, meta_batch: float, compute: float
) -> dict[str, Any]:
    """A row from mean seconds per meta-step: ``step``, the whole step (shards, reduce, outer step,
    the trainer's bookkeeping); ``meta_batch``, the engine's part (shards and reduce); ``compute``, the
    slowest worker's shard. ``outside_share`` is the share of ``step`` outside ``compute``, split into
    ``reduce_seconds`` (``meta_batch - compute``) and ``outer_seconds`` (``step - meta_batch``)."""
    return {
        "config": name,
        "impl": f"{reduce} x{workers}",
        "reduce": reduce,
        "workers": workers,
        "threads": 1,
        "seconds_per_step": step,
        "compute_seconds": compute,
        "reduce_seconds": meta_batch - compute,
        "outer_seconds": step - meta_batch,
        "tasks_per_second": tasks / step,
        "outside_share": max(0.0, 1 - compute / step),
    }


def driver_rows(name: str, workers: list[int], steps: int, sets: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The Ray engine (``engine.reduce: driver``) with W single-thread workers, and the per-task
    baseline alone on 2 threads.

    One engine per worker count is started up front; then, step by step, each
    engine takes a meta-step in turn and the baseline (in this process, while
    every worker is idle) computes one, so that all are timed under the same
    conditions. A step is the driver's ``Trainer.train_step``; its engine part
    ``RayEngine.meta_batch`` (the parameters sent, the shards, the sum); its compute,
    the slowest worker's shard. Reported: means over the timed steps (the
    baseline: the median).
    """
    import ray

    from distmaml.bench.measure import bench_config, step_fn
    from distmaml.cluster.placement import cpu_threads
    from distmaml.engine.ray_engine import RayEngine
    from distmaml.run.assembly import Run, assemble
    from distmaml.run.trainer import Trainer

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=sum(workers) + 1, include_dashboard=False, logging_level=logging.WARNING)
    engines: dict[int, tuple[Run, RayEngine, Trainer]] = {}
    try:
        for w in workers:
            config = bench_config(name, *sets, f"workers={w}", "engine.cpus_per_worker=1", "engine.driver_cpus=0.01")
            run = assemble(config)
            assert isinstance(run.engine, RayEngine)
            engines[w] = (run, run.engine, run.trainer(progress=False))
        torch.set_num_threads(2)
        base_config, baseline = step_fn(name, "baseline", "auto")
        steps_s: dict[int, list[float]] = {w: [] for w in workers}
        walls: dict[int, list[float]] = {w: [] for w in workers}
        computes: dict[int, list[float]] = {w: [] for w in workers}
        base_times: list[float] = []
        driver_threads = cpu_threads(next(iter(engines.values()))[0].config.engine.driver_cpus)
        for i in range(steps + 1):  # the first round is a warm-up
            torch.set_num_threads(driver_threads)  # the driver's own, as in a run
            for w, (_, engine, trainer) in engines.items():
                t0 = time.perf_counter()
                trainer.train_step()
                if i:
                    steps_s[w].append(time.perf_counter() - t0)
                    walls[w].append(engine.last_timing["wall"])
                    computes[w].append(engine.last_timing["compute"])
            torch.set_num_threads(2)
            t0 = time.perf_counter()
            baseline()
            if i:
                base_times.append(time.perf_counter() - t0)
    finally:
        for _, engine, _ in engines.values():
            engine.close()
        if started:
            ray.shutdown()
    base = statistics.median(base_times)
    tasks = base_config.meta.batch_size
    rows = [
        {
            "config": name,
            "impl": "baseline",
            "threads": 2,
            "seconds_per_step": base,
            "tasks_per_second": tasks / base,
        }
    ]
    return rows + [
        _engine_row(
            name,
            "driver",
            w,
            tasks,
            statistics.fmean(steps_s[w]),
            statistics.fmean(walls[w]),
            statistics.fmean(computes[w]),
        )
        for w in workers
    ]


def collective_rows(name: str, workers: list[int], steps: int, sets: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The collective engine (``engine.reduce: collective``) with W single-thread workers: one run of
    ``steps`` timed meta-steps per worker count, in turn, in a temporary run directory.

    The workers' own timing gives the row (``CollectiveEngine.timing``'s
    ``steady`` part): per step, rank 0's training loop, its
    ``GroupEngine.meta_batch`` (its shard and the sum) and the slowest
    worker's shard; means over ``steps`` steps. The run takes two more: a
    first one, untimed as the driver rows' first round is, and a last one,
    whose start ends the timed loop. The group's start-up, where ``batching:
    auto`` times its candidates, and the final validation and meta-test (2
    tasks per worker) are outside it.
    """
    import tempfile

    import ray

    from distmaml.bench.measure import bench_config
    from distmaml.engine.collective import CollectiveEngine
    from distmaml.run.assembly import assemble

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=max(workers) + 1, include_dashboard=False, logging_level=logging.WARNING)
    rows = []
    try:
        for w in workers:
            config = bench_config(
                name,
                *sets,
                "engine.reduce=collective",
                f"workers={w}",
                "engine.cpus_per_worker=1",
                "engine.driver_cpus=0.01",
                f"meta.steps={steps + 2}",
                "meta.val_every=0",
                f"meta.checkpoint_every={steps + 2}",
                f"meta.val_tasks={2 * w}",
                f"meta.test_tasks={2 * w}",
            )
            run = assemble(config)
            engine = run.engine
            assert isinstance(engine, CollectiveEngine)
            with tempfile.TemporaryDirectory(prefix="distmaml-bench-") as tmp:
                run.fit(Path(tmp) / "run", progress=False)
            timed, tasks = engine.timing["steady"], config.meta.batch_size
            n = timed["steps"]
            row = _engine_row(name, "collective", w, tasks, timed["loop"] / n, timed["wall"] / n, timed["compute"] / n)
            how = engine.timing["sum"]  # shm (one node), gloo or nccl; none with 1 worker
            rows.append({**row, "sum": how, "impl": row["impl"] + (f" ({how})" if w > 1 else "")})
    finally:
        if started:
            ray.shutdown()
    return rows


def compute_bound(name: str, workers: list[int], sets: Sequence[str] = (), seconds: float = 2.0) -> dict[str, Any]:
    """Per worker count W, the scaling the compute itself allows: in this process, on one thread and
    with no engine, the seconds of the whole meta-batch's meta-gradient over those of the largest of W
    shards (``balanced_ranges``), with the engine rows' batching (``sets``; ``auto`` chooses once, as a
    worker does). Whatever an engine's reduce costs, its W workers cannot beat this ratio unless
    their shards compute faster than one process alone. Where a step's compute has a large fixed part
    (a fast batching of small tasks), the bound is far below W.

    Every size in turn, until ``seconds`` have passed and at least 3 rounds were timed after an
    untimed one (``bench.interleaved_medians``). Returns ``bound`` (per W) and ``batch_seconds``, the
    whole batch's.
    """
    from distmaml.bench.measure import bench_config, interleaved_medians
    from distmaml.core.algorithm import init_algorithm_params
    from distmaml.engine.shard import balanced_ranges
    from distmaml.run.assembly import build_runner

    torch.set_num_threads(1)
    config = bench_config(name, *sets, "workers=0")
    runner = build_runner(config)
    flat = runner.layout.flatten(init_algorithm_params(runner.model, runner.algorithm))
    batch = config.meta.batch_size
    largest = {w: max(len(r) for r in balanced_ranges(batch, w)) for w in workers}
    sizes = sorted({batch, *largest.values()})
    for n in sizes:
        runner.choose_batching(n)  # auto: its one timing; compiled: a graph per size
    out = torch.empty(runner.layout.numel, dtype=runner.dtype)
    median = interleaved_medians(
        {n: functools.partial(runner.meta_grad, flat, 0, range(n), out=out) for n in sizes}, 3, seconds
    )
    return {"bound": {w: median[batch] / median[largest[w]] for w in workers}, "batch_seconds": median[batch]}


def _matmuls_in_window(start: float, seconds: float) -> float:
    """Matmuls per second on one thread between wall-clock ``start`` and ``start + seconds``."""
    torch.set_num_threads(1)
    a = torch.randn(256, 256)
    a @ a
    time.sleep(max(0.0, start - time.time()))
    done, end = 0, start + seconds
    while time.time() < end:
        a @ a
        done += 1
    return done / seconds


def side_by_side(seconds: float = 2.0) -> float:
    """What two single-thread processes computing at once get from this machine: their summed matmul
    rate over one process's alone (2.0 when both cores are free; less while a neighbour or the
    hypervisor takes one). Each in a fresh process; the pair starts on a common wall-clock time.

    One process alone is timed before the pair and after it, and the faster of the two counts: a
    burst of other work (Ray starting idle workers after a group ends) during one window would
    otherwise make the pair look better than two free cores (3x was seen in CI)."""
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(2) as pool:
        before = pool.apply(_matmuls_in_window, (time.time() + 2.0, seconds))
        start = time.time() + 2.0
        pair = pool.starmap(_matmuls_in_window, [(start, seconds)] * 2, chunksize=1)
        after = pool.apply(_matmuls_in_window, (time.time() + 0.5, seconds))
    return sum(pair) / max(before, after)


def engine_summary(rows: list[dict[str, Any]]) -> list[str]:
    """One line per engine row with a 1-worker row of the same config and reduce beside it."""
    lines = []
    for r in rows:
        if "scaling_vs_1_worker" in r:
            base = r.get("vs_baseline_2_threads")
            lines.append(
                f"{r['config']} {r['reduce']} x{r['workers']}: {r['scaling_vs_1_worker']:.2f}x the tasks/s of 1 worker"
                + (f" (the compute alone allows {r['compute_bound']:.2f}x), " if "compute_bound" in r else ", ")
                + (f"{base:.2f}x the baseline on 2 threads, " if base is not None else "")
                + f"{100 * r['outside_share']:.1f}% of the step outside the workers' compute "
                f"(per step: compute {1000 * r['compute_seconds']:.2f} ms, reduce {1000 * r['reduce_seconds']:.2f} ms, "
                f"outer step {1000 * r['outer_seconds']:.2f} ms)"
            )
    pairs = {r["config"]: r["side_by_side"] for r in rows if "side_by_side" in r}
    for config, pair in pairs.items():
        lines.append(
            f"{config}: right after its engine rows, two single-thread processes side by side got {pair:.2f}x "
            "one alone's matmul rate (2.00x: both cores free; less: a 2-worker row lost the difference too)"
        )
    return lines


def with_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Adds ``scaling_vs_1_worker`` (same config and reduce) and ``vs_baseline_2_threads`` to engine rows."""
    for r in rows:
        if "reduce" not in r:
            continue
        one = next(
            (x for x in rows if x.get("reduce") == r["reduce"] and x["config"] == r["config"] and x["workers"] == 1),
            None,
        )
        base = next(
            (x for x in rows if x["impl"] == "baseline" and x["config"] == r["config"] and x["threads"] == 2), None
        )
        if one is not None:
            r["scaling_vs_1_worker"] = r["tasks_per_second"] / one["tasks_per_second"]
        if base is not None:
            r["vs_baseline_2_threads"] = r["tasks_per_second"] / base["tasks_per_second"]
    return rows


ENGINES: dict[str, Callable[[str, list[int], int, Sequence[str]], list[dict[str, Any]]]] = {
    "driver": driver_rows,
    "collective": collective_rows,
}
"""Per ``engine.reduce``: the function timing its rows (each runs in a fresh process)."""


def parse_reduces(text: str) -> list[str]:
    """``--reduce driver,collective`` as a list; an unknown name is the user's error."""
    from distmaml.config import ConfigError

    reduces = [r.strip() for r in text.split(",") if r.strip()]
    unknown = [r for r in reduces if r not in ENGINES]
    if unknown or not reduces:
        raise ConfigError(f"--reduce {text}: allowed values are {', '.join(ENGINES)}, comma-separated")
    return reduces


def engine_rows(
    name: str, workers: list[int], reduces: Sequence[str], steps: int, sets: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """Rows of every reduce in ``reduces`` and worker count, each reduce in its own process, with the
    ratios to the same reduce's 1-worker row and to the baseline on 2 threads. Every row also gets
    ``compute_bound``, the scaling the shards' compute allows at its worker count (``compute_bound``,
    in its own process, before the rows), and with 2 workers ``side_by_side``, what two single-thread
    processes got from the machine right after the rows. ``sets``: config overrides of the engine
    rows (``--engine-set``, e.g. ``batching=compiled``)."""
    from distmaml.bench.measure import in_subprocess

    compute = in_subprocess(compute_bound, name, workers, list(sets))
    rows: list[dict[str, Any]] = []
    for reduce in reduces:
        n = steps
        if reduce == "collective":  # its steps are short: enough of them to time COLLECTIVE_SECONDS or more
            n = max(steps, min(COLLECTIVE_MAX_STEPS, math.ceil(COLLECTIVE_SECONDS / compute["batch_seconds"])))
        rows += [{**r, "sets": list(sets)} for r in in_subprocess(ENGINES[reduce], name, workers, n, list(sets))]
    pair = side_by_side() if 2 in workers else None
    for r in rows:
        if "reduce" in r:
            r["compute_bound"] = compute["bound"][r["workers"]]
            if pair is not None:
                r["side_by_side"] = pair
    return with_ratios(rows)
