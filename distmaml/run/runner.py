"""The task program of a run: one shard of tasks computed where it runs.

``TaskRunner`` holds a ready network, algorithm and task family (the
assembly, ``distmaml.run.assembly``, builds them from the config) and computes,
for the task ids it is given, the summed meta-gradient (one flat tensor) or
the per-task scores. It samples its own tasks from (seed, step, id), so no
data travels, and returns sums, so shards add up to the whole batch whatever
the split. The engine calls it and knows nothing else of the algorithm; a
Ray worker rebuilds it from the config (``assembly.runner_factory``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from distmaml.config import ConfigError
from distmaml.core import Algorithm, MetaGradSum, meta_grad, score_tasks
from distmaml.core.algorithm import init_algorithm_params
from distmaml.core.batching import (
    COMPILED,
    HOLDS_ALL,
    BatchingChoice,
    candidates,
    describe_batching,
    expected_bytes,
    fit_candidates,
    is_out_of_memory,
    time_candidates,
)
from distmaml.core.compiled import CompileError
from distmaml.engine.protocol import EvalShard, GradShard, ParamLayout
from distmaml.machine import memory
from distmaml.tasks import TaskFamily
from distmaml.typing import Params, TaskBatch

log = logging.getLogger("distmaml.engine")

AUTO_TASKS = 8
"""Tasks per timed meta-step when ``batching: auto`` times the candidates (at most the shard's)."""
AUTO_STEPS = 2
"""Timed meta-steps per candidate (after one untimed), at least..."""
AUTO_SECONDS = 0.5
"""...and more (up to 50) until each candidate has run this long: fast meta-steps are noisy."""
EVAL_CHUNK = 100
"""Tasks sampled and scored at once in an evaluation, at most (fewer where ``batching: auto`` measured
that a chunk this large would not fit: ``TaskRunner.eval_chunk``)."""


class TaskRunner:
    """Computes shards of meta-gradients and evaluations of one run.

    Args:
        model: the network (structure and dtype; its parameters are not used).
        algorithm: the algorithm with its inner loop.
        family: samples the tasks (``sample(split, step, ids)``).
        device: where the shard is computed (the network is moved there).
        batching: ``auto`` (timed here, see ``choose_batching``), one of ``core.batching.BATCHINGS``
            or ``compiled`` (compiled here, see ``prepare``).
    """

    def __init__(
        self,
        model: nn.Module,
        algorithm: Algorithm,
        family: TaskFamily,
        *,
        device: torch.device | str = "cpu",
        batching: str = "auto",
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.dtype = next(self.model.parameters()).dtype
        self.algorithm = algorithm
        self.inner = algorithm.inner
        self.family = family
        self.batching = batching
        self.layout = ParamLayout(init_algorithm_params(self.model, self.algorithm))
        self.measured: BatchingChoice | None = None
        """With ``batching: auto``, the timed choice (``choose_batching``), else None."""
        self.compiled: dict[str, float] = {}
        """With ``batching: compiled``, the graphs compiled so far: description -> seconds."""
        self._prepared: set[int] = set()

    def choose_batching(self, tasks: int) -> str:
        """This runner's batching: the configured one, or with ``auto`` the fastest candidate on this device.

        The first call with ``auto`` times a meta-step of every candidate on
        ``min(tasks, AUTO_TASKS)`` tasks of step 0 (``tasks``: the shard size
        this runner will see), with the initial meta-parameters, logs the
        timings in one line and keeps the choice for the rest of the run.
        With ``compiled`` it compiles for ``tasks`` tasks (``prepare``). The
        engines call it at start-up, so neither lands in a timed meta-step.
        """
        if self.batching == COMPILED and tasks not in self._prepared:
            self.prepare(tasks)
        if self.batching != "auto":
            return self.batching
        if self.measured is None:
            self.measured = self._time_what_fits(tasks)
            log.info(self.batching_line())
        return self.measured.choice

    def _time_what_fits(self, tasks: int) -> BatchingChoice:
        """``batching: auto``'s measurement: ``loop`` on one task, then the timing of the candidates that fit.

        What ``loop`` needs for one task is measured first (``memory.peak``) and
        every candidate expected to exceed what the worker has (``memory.available``)
        for a shard of ``tasks`` is left out (``core.batching.fit_candidates``).
        On a CPU all of it runs under ``memory.allocation_limit``, so that an
        estimate that was too low is an out-of-memory error (that candidate is
        dropped) rather than the kernel's OOM killer. Not even one task fitting
        is ``memory.MemoryFitError``: the run stops before its first step.
        """
        n = max(1, min(tasks, AUTO_TASKS))
        params = init_algorithm_params(self.model, self.algorithm)
        batch = self._tasks("train", 0, range(n))

        def run(name: str, on: TaskBatch = batch) -> None:
            meta_grad(self.model, params, on, self.algorithm, batching=name)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # time the device's work, not the launches

        budget = memory.available(self.device)
        one = batch.slice(0, 1)
        with memory.allocation_limit(self.device, budget):
            try:
                need = memory.peak(lambda: run("loop", one), self.device)
            except (RuntimeError, MemoryError) as e:
                if budget is None or not is_out_of_memory(e):
                    raise
                need = None
            if budget is not None and (need is None or need > budget):
                raise memory.refusal(
                    need, budget, self.device, first_order=self.inner.first_order, recompute=self.algorithm.recompute
                )
            shard = max(n, tasks)
            names, skipped = fit_candidates(candidates(self.model), need, budget, shard)
            fitted = {"one_task": need, "budget": budget, "shard": shard, "shared_by": memory.shared_by(self.device)}
            return time_candidates(
                run, names, steps=AUTO_STEPS, min_seconds=AUTO_SECONDS, tasks=n, skipped=skipped, memory=fitted
            )

    def prepare(self, tasks: int, step: int = 0) -> None:
        """With ``batching: compiled``: compiles the meta-gradient of ``tasks`` tasks as meta-step ``step`` runs it.

        One meta-step on tasks of ``step``, with the initial meta-parameters;
        nothing is compiled again for a graph already compiled (a later step
        with other settings, e.g. MAML++'s switch to second order, or another
        task count compiles then, logged the same way).
        """
        if self.batching == COMPILED and tasks > 0:
            self._prepared.add(tasks)
            params = init_algorithm_params(self.model, self.algorithm)
            self._meta_grad(params, step, self._tasks("train", step, range(tasks)))

    def _on_compile(self, what: str, seconds: float) -> None:
        self.compiled[what] = seconds
        log.info("batching compiled: compiled the meta-gradient of %s in %.1f s on %s", what, seconds, self.device)

    def _meta_grad(self, params: Params, step: int, batch: TaskBatch, batching: str = COMPILED) -> MetaGradSum:
        try:
            return meta_grad(
                self.model, params, batch, self.algorithm, batching=batching, step=step, on_compile=self._on_compile
            )
        except CompileError as e:
            raise ConfigError(str(e)) from e

    def batching_line(self) -> str:
        """``batching_report`` in words, for the log."""
        return f"{describe_batching(self.batching_report())} on {self.device}"

    def batching_report(self) -> dict[str, Any]:
        """For ``result.json``: the choice and, if timed, each candidate's seconds per meta-step."""
        if self.measured is None:
            report: dict[str, Any] = {"choice": self.batching, "seconds": {}, "tasks": 0}
            if self.compiled:
                report["compiled"] = dict(self.compiled)
            return report
        return self.measured.as_dict()

    def _params(self, flat: Tensor) -> Params:
        return self.layout.unflatten(flat.to(self.device, self.dtype))

    def _tasks(self, split: str, step: int, ids: Sequence[int]) -> TaskBatch:
        return self.family.sample(split, step, ids).to(self.device, self.dtype)

    def meta_grad(self, flat: Tensor, step: int, ids: Sequence[int], out: Tensor | None = None) -> GradShard:
        """Summed meta-gradient of tasks ``ids`` of meta-train step ``step``, as one flat CPU tensor.

        ``out``: a flat tensor to write the gradient into instead (on any device,
        e.g. a collective's buffer on this runner's GPU); it is returned as ``grad``.
        """
        # compiled: a graph for a new task count or new settings compiles on demand (logged)
        batching = COMPILED if self.batching == COMPILED else self.choose_batching(len(ids))
        s = self._meta_grad(self._params(flat), step, self._tasks("train", step, ids), batching)
        if out is not None:
            self.layout.flatten(s.grads, out=out)
            return GradShard(out, float(s.loss), float(s.metric), s.tasks)
        grad = self.layout.flatten(s.grads).cpu()  # the CPU waits for the device here
        return GradShard(grad, float(s.loss), float(s.metric), s.tasks)

    def evaluate(self, flat: Tensor, split: str, ids: Sequence[int], steps: int) -> EvalShard:
        """Scores tasks ``ids`` of ``split`` (step 0: a fixed held-out set) after ``steps`` inner steps,
        ``eval_chunk()`` tasks at a time (each task is a pure function of its id: the chunks change nothing)."""
        params, chunk = self._params(flat), self.eval_chunk()
        batching = self.measured.choice if self.measured is not None else self.batching
        befores, afters = [], []
        for start in range(0, len(ids), chunk):
            part = self._tasks(split, 0, ids[start : start + chunk])
            scores = score_tasks(self.model, params, part, self.algorithm, steps, batching=batching, chunk=chunk)
            befores.append(scores.before.cpu())
            afters.append(scores.after.cpu())
        if not befores:
            return EvalShard(torch.zeros(0), torch.zeros(0))
        return EvalShard(torch.cat(befores), torch.cat(afters))

    def eval_chunk(self) -> int:
        """Tasks an evaluation samples and scores at once: ``EVAL_CHUNK``, or fewer where ``batching: auto``
        chose a candidate that holds every task at once (``vmap``, ``batched``) and its measurement says
        ``EVAL_CHUNK`` of them would not fit in the worker's budget. (Scoring keeps no second-order graph:
        a task costs less than in the meta-step it was measured by, so the estimate errs towards fitting.)"""
        fitted = self.measured.memory if self.measured is not None else {}
        one, budget = fitted.get("one_task"), fitted.get("budget")
        if self.measured is None or self.measured.choice not in HOLDS_ALL or not one or not budget:
            return EVAL_CHUNK
        return max(1, min(EVAL_CHUNK, budget // expected_bytes(self.measured.choice, one, 1)))
