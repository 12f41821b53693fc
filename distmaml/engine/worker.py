"""The worker actor's body: a ``TaskRunner``, built in the actor, pinned to its own threads and device.

A plain class; the Ray engine wraps it with ``ray.remote`` when it creates
actors, so this module does not import Ray at all.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from distmaml.runner import EvalShard, GradShard, TaskRunner


class ShardWorker:
    """Computes shards of each meta-step on the device Ray gave this actor."""

    def __init__(self, build_runner: Callable[[], TaskRunner], threads: int, tasks: int = 0) -> None:
        # One process per worker scales far better on CPUs than threads in one
        # process (1.97x vs 1.4x for two on this machine's 2 cores).
        torch.set_num_threads(max(1, threads))
        self.runner = build_runner()
        if tasks:  # batching: auto is timed here, at start-up, on this actor's device and threads
            self.runner.choose_batching(tasks)

    def use_batching(self, name: str) -> None:
        """Computes with ``name`` from now on (the engine's common choice), whatever this worker timed."""
        self.runner.batching = name

    def meta_grad(self, flat: Tensor, step: int, start: int, stop: int) -> GradShard:
        t0 = time.perf_counter()
        shard = self.runner.meta_grad(flat, step, range(start, stop))
        return shard._replace(seconds=time.perf_counter() - t0)

    def evaluate(self, flat: Tensor, split: str, start: int, stop: int, steps: int) -> EvalShard:
        return self.runner.evaluate(flat, split, range(start, stop), steps)

    def describe(self) -> dict[str, Any]:
        """Where this actor runs (pid, node, visible GPUs, torch device, threads) and its batching."""
        import ray

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
