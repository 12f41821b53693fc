"""The worker actor's body: a ``TaskRunner``, built in the actor, pinned to its own threads and device.

A plain class; the Ray engine wraps it with ``ray.remote`` when it creates
actors, so this module does not import Ray at all.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from distmaml.engine.protocol import EvalShard, GradShard, TaskProgram
from distmaml.engine.testpoints import eval_point, point
from distmaml.errors import DistmamlError
from distmaml.fastpath import malloc
from distmaml.machine import memory


def to_wire(t: Tensor) -> np.ndarray:
    """A CPU tensor as the numpy array it shares memory with: Ray stores numpy arrays as raw buffers and
    reads them in place, where a tensor is pickled (about 15x slower for a 12M-value gradient)."""
    return t.detach().cpu().numpy()


def from_wire(a: np.ndarray, *, copy: bool = False) -> Tensor:
    """The tensor of an array ``to_wire`` sent. Ray hands such arrays over read-only, in its object store:
    without ``copy`` the tensor is a read-only view (only read it)."""
    if copy:
        return torch.from_numpy(np.array(a))
    with warnings.catch_warnings():  # torch warns that the array is not writable: the view is only read
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


class WireShard(NamedTuple):
    """A ``GradShard`` with its gradient as a numpy array (``to_wire``), as a worker returns it."""

    grad: np.ndarray
    loss: float
    metric: float
    tasks: int
    seconds: float

    def shard(self) -> GradShard:
        return GradShard(from_wire(self.grad), self.loss, self.metric, self.tasks, self.seconds)


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

    def meta_grad(self, flat: np.ndarray, step: int, start: int, stop: int) -> WireShard:
        """The shard's summed meta-gradient; ``flat``: the parameters as ``to_wire`` sent them."""
        point(f"step:{step}")
        t0 = time.perf_counter()
        shard = self.runner.meta_grad(from_wire(flat, copy=True), step, range(start, stop))
        return WireShard(to_wire(shard.grad), shard.loss, shard.metric, shard.tasks, time.perf_counter() - t0)

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
