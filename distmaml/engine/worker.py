"""The worker actor's body: a ``TaskRunner``, built in the actor, pinned to its own threads and device.

A plain class; the Ray engine wraps it with ``ray.remote`` when it creates
actors, so this module does not import Ray at all.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from distmaml.engine.protocol import EvalShard, GradShard, TaskProgram, from_wire
from distmaml.engine.testpoints import eval_point, point
from distmaml.errors import DistmamlError
from distmaml.fastpath import malloc
from distmaml.machine import memory


class ShardWorker:
    """Computes shards of each meta-step on the device Ray gave this actor."""

    def __init__(
        self, build_runner: Callable[[], TaskProgram], threads: int, tasks: int = 0, share: tuple[int, int] = (1, 1)
    ) -> None:
        """``share``: how many of the run's workers share this one's node and its GPU (``memory.share``)."""
        # One process per worker scales far better on CPUs than threads in one
        # process (1.97x vs 1.4x for two on this machine's 2 cores).
        point("startup")
        torch.set_num_threads(max(1, threads))
        malloc.claim()  # an actor process of distmaml's: its runner keeps the memory it frees
        memory.share(*share)
        # A setting or input this worker cannot go on with (not even one task fits its memory, a damaged
        # task store) is told by describe(): raised in __init__ it would reach the driver as a dead actor
        # with text only, and be replaced as if the worker had been lost.
        self.refused: DistmamlError | None = None
        try:
            self.runner = build_runner()
            if tasks:  # batching: auto is timed here, at start-up, on this actor's device and threads
                point("batching")
                self.runner.choose_batching(tasks)
        except DistmamlError as e:
            self.refused = e

    def use_batching(self, name: str) -> None:
        """Computes with ``name`` from now on (the engine's common choice), whatever this worker timed."""
        self.runner.batching = name

    def meta_grad(self, flat: np.ndarray, step: int, start: int, stop: int) -> GradShard:
        """The shard's summed meta-gradient, with its compute time; ``flat``: the parameters as ``to_wire``
        sent them."""
        point(f"step:{step}")
        t0 = time.perf_counter()
        shard = self.runner.meta_grad(from_wire(flat, copy=True), step, range(start, stop))
        return shard._replace(seconds=time.perf_counter() - t0)

    def evaluate(self, flat: np.ndarray, split: str, start: int, stop: int, steps: int) -> EvalShard:
        eval_point(split)
        return self.runner.evaluate(from_wire(flat, copy=True), split, range(start, stop), steps)

    def describe(self) -> dict[str, Any]:
        """Where this actor runs (pid, node, visible GPUs, torch device, threads) and its batching.

        Raises the one-line error of a worker that cannot go on (``refused``): not even one task fits
        (``MemoryFitError``), a damaged task store (``DataError``).
        """
        import ray

        if self.refused is not None:
            raise self.refused

        return {
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "device": str(self.runner.device),
            "threads": torch.get_num_threads(),
            "batching": self.runner.batching_report(),
            "batching_line": self.runner.batching_line(),
        }
