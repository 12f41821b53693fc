"""What every benchmark row is made of: the bench configs, timing (interleaved medians) and memory
(peak RSS, in a fresh subprocess), one config's step measured in this process."""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

from distmaml.config import Config, load_config
from distmaml.machine.environ import environ
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


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__}


# -- memory of this process (Linux) --------------------------------------------------
def status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def reset_peak_rss() -> None:
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
def matmul_gflops(threads: int) -> float:
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
    from distmaml.core import meta_grad
    from distmaml.run.assembly import build_runner

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
    from distmaml.run.assembly import build_runner

    torch.set_num_threads(threads)
    config = bench_config(name, "workers=0", "batching=auto")
    runner = build_runner(config, device="cpu")
    runner.choose_batching(config.meta.batch_size)
    return runner.batching_report()


def step_fn(name: str, impl: str, batching: str) -> tuple[Config, Any]:
    """The config and a zero-argument function computing one meta-step's gradient with ``impl``
    (``core`` uses ``batching``; ``core-<batching>`` names its own)."""
    from distmaml.bench.baseline import baseline_meta_gradient, native_twin
    from distmaml.core import meta_grad
    from distmaml.run.assembly import build_runner

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


def time_interleaved(name: str, impls: list[str], batching: str, threads: int, steps: int) -> dict[str, float]:
    """Median seconds per meta-step of each implementation, timed in turn in one process."""
    torch.set_num_threads(threads)
    return interleaved_medians({impl: step_fn(name, impl, batching)[1] for impl in impls}, steps)


def measure_one(name: str, impl: str, batching: str, threads: int, steps: int) -> dict[str, Any]:
    """Peak memory and FLOPs of one implementation, alone in this process; seconds per step too."""
    torch.set_num_threads(threads)
    config, step = step_fn(name, impl, batching)
    step()  # warm-up: allocations, lazy initialisation
    reset_peak_rss()
    rss0 = status_kb("VmRSS")
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - t0) / steps
    peak_mb = max(0, status_kb("VmHWM") - rss0) / 1024
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


def in_subprocess(fn: Any, *args: Any, env: dict[str, str] | None = None) -> Any:
    """``fn(*args)`` in a fresh process, with ``env`` added to its environment."""
    with environ(env or {}), mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


# For peak memory: glibc then serves every allocation of 64 kB or more with its own
# mmap and returns it on free, so the RSS follows the live tensors instead of what
# the allocator happens to keep cached (which made repeated peaks differ by 1.5x).
# Its timings are not reported (the interleaved run's are).
EXACT_RSS = {"MALLOC_MMAP_THRESHOLD_": "65536"}


# -- per algorithm: memory and time against inner steps ----------------------------------------
def malloc_trim() -> None:
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
    from distmaml.config import config_from_dict
    from distmaml.core import meta_grad
    from distmaml.run.assembly import build_runner, init_meta_params

    torch.set_num_threads(threads)
    config = config_from_dict(config_dict)
    runner = build_runner(config, device="cpu")
    batch = runner.family.sample("train", 0, range(config.meta.batch_size)).to(dtype=runner.dtype)
    params = init_meta_params(config, runner.model)

    def step(tasks: Any = batch) -> None:
        meta_grad(runner.model, params, tasks, runner.algorithm, batching=config.batching)

    step(batch.slice(0, 1))
    malloc_trim()
    reset_peak_rss()
    rss0 = status_kb("VmRSS")
    t0 = time.perf_counter()
    step()
    peak_mb = max(0, status_kb("VmHWM") - rss0) / 1024
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
                row = in_subprocess(measure_config, bench_config(name, *extra).to_dict(), 1, steps)
                row["config"] = name
                rows.append(row)
    for r in rows:  # memory relative to the same algorithm's first inner-step count, without recompute
        ref = next(x for x in rows if x["algorithm"] == r["algorithm"] and not x["recompute"])
        r["memory_vs_fewest_steps"] = r["peak_mb"] / ref["peak_mb"] if ref["peak_mb"] else None
    return rows
