"""How the tasks of a batch are computed: four candidates, how a worker picks one, and ``compiled``.

Every candidate computes the same meta-gradient (tests: 1e-10 in float64
against plain autograd, for every algorithm, first and second order):

* ``loop``: one task at a time, plain autograd; memory of one task's graph.
* ``loop_channels_last``: the same loop with image inputs in channels-last
  (NHWC) layout, so every convolution, batch-norm and max-pool of a conv net
  runs on NHWC tensors. A candidate for networks with 2-d convolutions.
* ``vmap``: ``torch.func.grad`` of one task's objective under ``vmap`` over
  tasks (a convolution with weights per task becomes one grouped
  convolution); memory of every task's graph at once.
* ``batched``: all tasks at once by plain autograd: the adapted parameters
  get one copy per task, each forward pass is ``vmap``'ed over tasks, and
  autograd differentiates the sum of the task losses (each copy receives
  its own task's gradient). ``vmap`` without ``torch.func``'s grad layer.

Under ``vmap`` and ``batched``, batch-norm is written out (torch 2.14's
native one gave a wrong second-order gradient under ``vmap``).

Which is fastest depends on the model and the device, so with ``batching:
auto`` each worker measures: ``time_candidates`` takes turns running a
meta-step of each candidate on a few of the worker's own tasks, on its own
device, and keeps the fastest (``distmaml.run.runner.TaskRunner`` does it once at
start-up, logs the timings and reports them in ``result.json``). On the
2-core CPU this project is developed on (torch 2.14, 1 thread, meta-steps of
8 tasks as ``auto`` times them):

* sinusoid MLP 1-40-40-1: ``batched`` 1.0-1.7x the tasks/s of ``vmap``
  (runs differ), 3-6x ``loop``.
* conv4-64, Omniglot 5-way 1-shot, 15 queries: ``loop_channels_last`` about
  1.35x ``loop`` (torch's CPU max-pool ran about 20x slower on NCHW float
  tensors than on NHWC, its batch-norm 6x), with no more memory; ``batched``
  2.2x and ``vmap`` 3.4x slower than ``loop``, with over 10x its memory.

A GPU may well order them differently; that is why the choice is timed where
it runs. ``choose_batching`` is the unmeasured rule (this CPU's winners),
used by the library's ``batching="auto"``, where nothing is timed.

A fifth way, ``compiled`` (``core.compiled``), is never timed by ``auto``:
the user opts in. The ``vmap`` computation of a whole shard is traced once
(``make_fx``) into a graph of aten operations and compiled by
inductor (C++ on a CPU, Triton on a GPU), cached per
network, algorithm settings, and shapes; the first call for a new task count
compiles. On small networks a meta-step is mostly per-call overhead, which
compiling removes. Same CPU, 1 thread, machine shared with other work:

* sinusoid MLP, 25 / 13 / 12 tasks: 0.43 / 0.30 / 0.27 ms per meta-step,
  against 4.1 / 2.9 / 2.5 ms for the best eager candidate: about 9.6x.
  Compiling took 12-29 s per task count, 1-2 s in a second process
  (inductor's on-disk cache; tracing is most of it).
* conv4-64 Omniglot, 32 / 16 tasks: 17.5 / 11.4 s per meta-step against
  6.0 / 4.6 s for ``loop_channels_last``: 2.5-3x *slower*, after 5-6 minutes
  of compiling. A conv net's meta-step is compute, not overhead, and the
  compiled graph keeps ``vmap``'s grouped convolutions and NCHW layout.
  Use ``compiled`` for small networks (MLPs, tiny conv nets).

Tracing the ``batched`` path instead gave a graph that ran 2x (MLP) to 2.3x
(conv4) slower once compiled and took about 3x as long to compile.

Memory comes before speed: ``vmap`` and ``batched`` hold every task's graph
at once, and on a large network one task's graph is gigabytes. ``auto``
therefore first measures what ``loop`` needs for one task (``distmaml.machine.memory``)
and times only the candidates whose expected memory, ``expected_bytes``, fits
in what the worker has (``fit_candidates``); a candidate that runs out of
memory while timed is dropped too. Both are recorded as ``skipped``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

BATCHINGS = ("loop", "loop_channels_last", "vmap", "batched")
"""The eager candidates: what ``auto`` may time and pick."""
COMPILED = "compiled"
"""The compiled meta-gradient (``core.compiled``)."""
ALLOWED_BATCHINGS = ("auto", *BATCHINGS, COMPILED)
"""Every value of ``batching``: ``compiled`` is opt-in (it compiles for tens of seconds at start-up)."""


def _has_conv2d(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def candidates(model: nn.Module) -> tuple[str, ...]:
    """The batchings worth timing for ``model``: channels-last only for 2-d convolutional nets."""
    if _has_conv2d(model):
        return BATCHINGS
    return ("loop", "vmap", "batched")


def choose_batching(model: nn.Module, device: torch.device | str) -> str:
    """The unmeasured rule: ``"loop_channels_last"`` for 2-d conv nets, ``"batched"`` otherwise.

    What this CPU measured (module docstring); workers time the candidates instead.
    """
    del device  # unmeasured: the CPU's choice; workers measure theirs (time_candidates)
    return "loop_channels_last" if _has_conv2d(model) else "batched"


class BatchingChoice(NamedTuple):
    """The candidate kept, and the median seconds of a timed meta-step of each candidate timed to the end."""

    choice: str
    seconds: dict[str, float]
    tasks: int
    """Tasks per timed meta-step."""
    skipped: dict[str, str] = {}
    """Candidates not timed (expected not to fit) or dropped (out of memory), and why."""
    memory: dict[str, Any] = {}
    """What the choice was fitted by: ``one_task`` (bytes ``loop`` needed for one task), ``budget``
    (bytes the worker had), ``shard`` (tasks per shard); None where unknown."""

    def as_dict(self) -> dict[str, Any]:
        out = {"choice": self.choice, "seconds": self.seconds, "tasks": self.tasks}
        if self.skipped or self.memory:
            out.update(skipped=dict(self.skipped), memory=dict(self.memory))
        return out


PER_TASK_FACTOR = {"loop": 1.0, "loop_channels_last": 1.5, "vmap": 4.0, "batched": 2.0}
"""Bytes a candidate needs per task held, in units of ``loop``'s one task, with room to spare.

Measured per task held (this CPU, torch 2.14): conv4-64 Omniglot ``vmap``
2.2x, ``batched`` 1.3x, ``loop_channels_last`` 1.0x; first-order ResNet-12 at
84x84, one task: ``loop`` 4.4 GiB, ``vmap`` 3.0x, ``batched`` 1.4x,
``loop_channels_last`` 1.0x. ``loop`` and ``loop_channels_last`` hold one task
at a time whatever the shard.
"""

HOLDS_ALL = ("vmap", "batched")
"""The candidates that hold every task of a shard at once."""


def expected_bytes(name: str, one_task: int, tasks: int) -> int:
    """What candidate ``name`` is expected to need for a shard of ``tasks``, given ``loop``'s ``one_task`` bytes."""
    held = max(1, tasks) if name in HOLDS_ALL else 1
    return int(one_task * PER_TASK_FACTOR.get(name, 3.0) * held)


def fit_candidates(
    names: Sequence[str], one_task: int | None, budget: int | None, tasks: int
) -> tuple[list[str], dict[str, str]]:
    """The candidates expected to fit in ``budget`` bytes for a shard of ``tasks``, and why the others do not.

    Args:
        names: the candidates, e.g. ``candidates(model)``.
        one_task: what ``loop`` needed for one task (bytes); None when it could not be measured.
        budget: what the worker has (``memory.available``): a CPU's room or a GPU's free
            memory, margin applied; None when unknown (nothing is skipped then).
        tasks: the shard's tasks, which ``vmap`` and ``batched`` hold at once.

    Example:
        >>> fit_candidates(["loop", "vmap"], one_task=2 << 30, budget=8 << 30, tasks=2)
        (['loop'], {'vmap': 'needs about 16.0 GiB for 2 tasks at once, the worker has 8.0 GiB'})
    """
    if one_task is None or budget is None:
        return list(names), {}
    fit, skipped = [], {}
    for name in names:
        need = expected_bytes(name, one_task, tasks)
        if need <= budget:
            fit.append(name)
        else:
            held = f"{tasks} tasks at once" if name in HOLDS_ALL and tasks > 1 else "one task"
            skipped[name] = f"needs about {_human(need)} for {held}, the worker has {_human(budget)}"
    return fit, skipped


def _human(n: float) -> str:
    return f"{n / (1 << 30):.1f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.0f} MiB"


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` says an allocation could not be served: torch's ``OutOfMemoryError`` (a GPU),
    Python's ``MemoryError``, or the ``RuntimeError`` of torch's CPU allocator under an address-space
    limit (``DefaultCPUAllocator: can't allocate memory``, measured with torch 2.14)."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and "can't allocate memory" in str(error)


def describe_batching(report: Mapping[str, Any]) -> str:
    """One line for the log: ``BatchingChoice.as_dict()`` (or a worker's report) in words."""
    times = ", ".join(f"{k} {v:.4f}" for k, v in report["seconds"].items())
    if report.get("compiled"):
        done = ", ".join(f"{k} in {v:.1f} s" for k, v in report["compiled"].items())
        return f"batching {report['choice']} (set in the config; compiled {done})"
    if not times:
        return f"batching {report['choice']} (set in the config)"
    skipped = "".join(f"; {k} skipped: {v}" for k, v in report.get("skipped", {}).items())
    return f"batching {report['choice']} (seconds per meta-step of {report['tasks']} tasks: {times}{skipped})"


def time_candidates(
    run: Callable[[str], object],
    names: Sequence[str],
    *,
    steps: int = 2,
    min_seconds: float = 0.0,
    max_rounds: int = 50,
    tasks: int = 0,
    clock: Callable[[], float] = time.perf_counter,
    skipped: Mapping[str, str] | None = None,
    memory: Mapping[str, Any] | None = None,
) -> BatchingChoice:
    """Times ``run(name)`` for each candidate, in turns, and keeps the fastest.

    Each candidate runs once untimed (allocations, lazy initialisation), then
    ``steps`` timed rounds take turns candidate by candidate, so a change in
    the machine's load touches all of them alike; the median counts. A
    candidate that runs out of memory is out (``skipped``); a
    candidate more than 3x slower than the best after a round stops being
    timed (it cannot win, and ``vmap`` on a conv net is slow and large).

    Args:
        run: computes one meta-step with the named batching (and waits for the device).
        names: the candidates, e.g. ``candidates(model)``.
        steps: timed rounds, at least.
        min_seconds: more rounds (up to ``max_rounds``) until every candidate
            still in the race has run this long in all: a meta-step of a few
            milliseconds needs many to rise above the noise.
        tasks: tasks per meta-step, recorded in the result.
        clock: seconds now (injectable for tests).
        skipped: candidates left out before timing, and why (``fit_candidates``), recorded in the result.
        memory: what they were fitted by, recorded in the result.
    """
    if not names:
        raise ValueError("time_candidates needs at least one candidate")
    times: dict[str, list[float]] = {n: [] for n in names}
    out = dict(skipped or {})
    live = list(names)
    for name in list(live):
        try:
            run(name)
        except (RuntimeError, MemoryError) as e:
            if not is_out_of_memory(e):
                raise
            live.remove(name)
            out[name] = "ran out of memory while timed"
    rounds = 0
    while live and (rounds < steps or (rounds < max_rounds and min(sum(times[n]) for n in live) < min_seconds)):
        rounds += 1
        for name in list(live):
            t0 = clock()
            try:
                run(name)
            except (RuntimeError, MemoryError) as e:
                if not is_out_of_memory(e):
                    raise
                live.remove(name)
                times[name] = []
                out[name] = "ran out of memory while timed"
                continue
            times[name].append(clock() - t0)
        if live:
            best = min(statistics.median(times[n]) for n in live)
            live = [n for n in live if statistics.median(times[n]) <= 3 * best]
    seconds = {n: statistics.median(ts) for n, ts in times.items() if n not in out}
    if not seconds:
        raise torch.OutOfMemoryError(f"every batching ran out of memory on {tasks} tasks: {', '.join(names)}")
    choice = min(seconds, key=lambda n: seconds[n])
    return BatchingChoice(choice, seconds, tasks, out, dict(memory or {}))
