"""The engine inside each worker of a collective group: its own shard, then an all-reduce.

Every worker of a ``torch.distributed`` process group holds the same
meta-parameters and runs the same ``Trainer``; this engine gives it what the
driver's engines give theirs, computed among the workers:

* ``meta_batch``: the worker computes the summed meta-gradient of its balanced
  range of the step's task ids (``balanced_ranges``, as the Ray engine splits
  them) into one preallocated flat buffer whose last three entries carry the
  loss, metric and task sums; one sum of that buffer over the workers gives
  every worker the whole batch's sums, so all take the identical outer step.
  The sum is an ``all_reduce(SUM)``, except in a CPU group on one node, where
  it goes through shared memory (``engine.shm``: gloo's latency here was
  about a sinusoid meta-step's compute);
* ``evaluate``: each worker scores its range of the held-out tasks and one
  ``all_gather`` returns every score in task order.

Only torch.distributed is used (gloo on CPUs, NCCL on GPUs); the group itself
is set up by whoever starts the workers (``engine.collective``, Ray Train). One
worker is the degenerate case: no collective call is made.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from distmaml.engine.protocol import EvalShard, GradShard, TaskProgram
from distmaml.engine.shard import balanced_ranges, common_batching
from distmaml.engine.shm import GroupSum
from distmaml.engine.testpoints import eval_point, point
from distmaml.machine.memory import MemoryFitError

EXTRA = 4
"""Entries after the gradient in the all-reduced buffer: loss, metric and task sums, and the stop request
(a signal number that rank 0 alone sets: every worker reads the same sum, so all stop after the same step)."""


class GroupEngine:
    """This worker's part of a collective group of ``world`` workers (rank ``rank``).

    Args:
        runner: the run's task program, built in this worker.
        rank, world: this worker's rank and the group's size (``torch.distributed``
            must be initialised when ``world > 1``).
        batch_size: the meta-batch size, to time ``batching: auto`` on this
            worker's shard size at start-up; every worker then uses the
            candidate with the least summed time (a collective call).
    """

    replacements = 0

    def __init__(self, runner: TaskProgram, rank: int, world: int, *, batch_size: int = 0) -> None:
        self.runner = runner
        self.rank = rank
        self.workers = world
        self.device = runner.device if world > 1 and dist.get_backend() == "nccl" else torch.device("cpu")
        """Where the collectives' tensors live: the GPU for NCCL, else the CPU (gloo)."""
        n = runner.layout.numel
        self._buffer = torch.zeros(n + EXTRA, dtype=runner.dtype, device=self.device)
        self._grad = self._buffer[:n]
        self._extra: Any = self._buffer[n:].numpy() if self.device.type == "cpu" else self._buffer[n:]
        """The loss, metric and task sums (numpy's view on the CPU: 3 stores of 0.1 us, not 3 us each)."""
        self._ranges: dict[int, range] = {}
        self.compute: list[float] = []
        """Per meta-step: seconds this worker computed its shard."""
        self.wall: list[float] = []
        """Per meta-step: seconds of the whole ``meta_batch`` (shard, all-reduce, copy back)."""
        self.starts: list[float] = []
        """Per meta-step: when ``meta_batch`` began (``time.perf_counter``), after the first step's barrier."""
        self.last_timing: dict[str, float] = {}
        """The last meta-step's ``wall`` and ``compute``, as ``RayEngine.last_timing``."""
        self.stop_request = 0
        """Set (on rank 0, by ``engine.collective``'s watcher) to the signal that asks the group to stop."""
        self.stopped = 0
        """After a meta-step: the stop request every worker received with it (0: none); the trainer then
        stops after that step (``assembly.GroupReporter``)."""
        self._sum = GroupSum(rank, world, self._buffer.numel(), self._buffer.dtype, self.device)
        """The step's sum: through shared memory in a CPU group on one node (``engine.shm``), else gloo's or NCCL's."""
        self._reports = [runner.batching_report()]
        self._common: str | None = None
        if batch_size:
            point("batching")
            refused: MemoryFitError | None = None
            try:
                runner.choose_batching(len(self._my_range(batch_size)))
            except MemoryFitError as e:  # told to every worker: each raises it alike, the group ends at once
                refused = e
            gathered = self._gather_objects(refused or runner.batching_report())
            first = next((r for r in gathered if isinstance(r, MemoryFitError)), None)
            if first is not None:
                raise first
            self._reports = gathered
            self._common = common_batching(self._reports)
            if self._common is not None:
                runner.batching = self._common

    # -- helpers ------------------------------------------------------------------
    def _gather_objects(self, obj: Any) -> list[Any]:
        if self.workers == 1:
            return [obj]
        out: list[Any] = [None] * self.workers
        dist.all_gather_object(out, obj)
        return out

    def _my_range(self, total: int) -> range:
        """This worker's task ids of a batch of ``total`` (cached: one list per batch size, not per step)."""
        r = self._ranges.get(total)
        if r is None:
            r = self._ranges[total] = balanced_ranges(total, self.workers)[self.rank]
        return r

    # -- the engine interface -------------------------------------------------------
    def meta_batch(self, flat: Tensor, step: int, batch_size: int) -> GradShard:
        if not self.compute and self.workers > 1:
            # The first step starts together: rank 0 sets its run up (run directory, MLflow) before its
            # loop while the others are already computing, and a shard timed from before rank 0's
            # first step began would not fit inside rank 0's steps (the bench's split of a step).
            dist.barrier()
        point(f"step:{step}")
        t0 = time.perf_counter()
        self.starts.append(t0)
        ids = self._my_range(batch_size)
        shard = self.runner.meta_grad(flat, step, ids, out=self._grad)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the shard's compute ends here, not at the all-reduce
        t1 = time.perf_counter()
        extra = self._extra
        extra[0], extra[1], extra[2], extra[3] = shard.loss, shard.metric, shard.tasks, self.stop_request
        self._sum(self._buffer)
        loss, metric, tasks, stop = extra.tolist()
        self.stopped = round(stop)
        grad = self._grad if self.device.type == "cpu" else self._grad.cpu()
        t2 = time.perf_counter()
        self.compute.append(t1 - t0)
        self.wall.append(t2 - t0)
        self.last_timing = {"wall": t2 - t0, "compute": t1 - t0}
        return GradShard(grad, loss, metric, round(tasks), t1 - t0)

    def evaluate(self, flat: Tensor, split: str, tasks: int, steps: int) -> EvalShard:
        eval_point(split)
        ranges = balanced_ranges(tasks, self.workers)
        mine = ranges[self.rank]
        longest = max(len(r) for r in ranges)
        local = torch.zeros(2, longest, dtype=torch.float64, device=self.device)
        if len(mine):
            scores = self.runner.evaluate(flat, split, mine, steps)
            local[0, : len(mine)] = scores.before
            local[1, : len(mine)] = scores.after
        if self.workers == 1:
            parts = [local]
        else:
            parts = [torch.empty_like(local) for _ in range(self.workers)]
            dist.all_gather(parts, local)
        before = torch.cat([p[0, : len(r)] for p, r in zip(parts, ranges)]).cpu()
        after = torch.cat([p[1, : len(r)] for p, r in zip(parts, ranges)]).cpu()
        return EvalShard(before, after)

    def batching(self) -> dict[str, Any]:
        """The batching every worker uses, and each worker's own timings from start-up."""
        return {"choice": self._common or self._reports[0]["choice"], "workers": self._reports}

    @property
    def node_sum(self) -> str:
        """How the step's sum is taken: ``shm`` (``engine.shm``), ``gloo``, ``nccl``, or ``none`` (1 worker)."""
        return self._sum.kind

    def timing(self) -> dict[str, Any]:
        """Totals over the meta-steps so far: ``steps``; ``compute``, the sum over steps of the slowest
        worker's shard; ``wall``, this worker's own ``meta_batch`` time summed over steps (its shard,
        its wait for the others, the sum); and ``sum``, ``node_sum``. Rank 0's ``wall`` is part of rank
        0's step, so the bench splits that step into compute, reduce and outer step without a
        negative part (a per-step maximum of walls over workers can exceed any worker's own step
        when the slowest changes from step to step). A collective call: every worker calls it.

        ``steady``, with 3 steps or more: the same over the steps between the first and the last
        (a warm-up step: first allocations, caches, the group's start-up still running around it),
        with ``loop``, this worker's seconds from the start of the second step to the start of the
        last: its whole training loop over those steps (shard, sum, outer step, its callbacks)."""
        compute = torch.tensor(self.compute, dtype=torch.float64, device=self.device)
        if self.workers > 1:
            dist.all_reduce(compute, op=dist.ReduceOp.MAX)
        n = len(self.compute)
        timing: dict[str, Any] = {
            "steps": n,
            "compute": float(compute.sum()),
            "wall": sum(self.wall),
            "sum": self.node_sum,
        }
        if n >= 3:
            timing["steady"] = {
                "steps": n - 2,
                "compute": float(compute[1:-1].sum()),
                "wall": sum(self.wall[1:-1]),
                "loop": self.starts[-1] - self.starts[1],
            }
        return timing

    def close(self) -> None:
        pass
