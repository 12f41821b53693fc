"""The engine's contract, in one place: what the trainer asks of an engine (``Engine``), what an engine
asks of the task program it runs on each worker (``TaskProgram``), and what travels between them: the
meta-parameters as one flat tensor (``ParamLayout``) and a shard's sums (``GradShard``, ``EvalShard``).

Two engines implement ``Engine``: the driver engines (``local.InProcessEngine``, ``ray_engine.RayEngine``),
whose driver sums the workers' shards, and the collective group (``collective``, ``group.GroupEngine``),
whose workers sum them among themselves. ``distmaml.run.runner.TaskRunner`` implements ``TaskProgram``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
from torch import Tensor

from distmaml.typing import Params


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


class GradShard(NamedTuple):
    """Sums over a shard's tasks: flat gradient, query loss, metric; and the count.

    The one type of a shard's result, from the task program that computes it to the driver that adds
    them up: between processes (a Ray actor's return value) it travels as itself, its gradient as a raw
    numpy buffer (``__reduce__``), and arrives as a ``GradShard`` whose gradient is a read-only view of
    that buffer.
    """

    grad: Tensor
    loss: float
    metric: float
    tasks: int
    seconds: float = 0.0
    """Compute time of the shard where it ran (for the benchmark's overhead share)."""

    def __reduce__(self) -> tuple[Any, ...]:
        return _shard_from_wire, (to_wire(self.grad), self.loss, self.metric, self.tasks, self.seconds)


def _shard_from_wire(grad: np.ndarray, loss: float, metric: float, tasks: int, seconds: float) -> GradShard:
    return GradShard(from_wire(grad), loss, metric, tasks, seconds)


class EvalShard(NamedTuple):
    """Per-task query metric before and after adaptation, in task-id order."""

    before: Tensor
    after: Tensor


class ParamLayout:
    """Names and shapes of the meta-parameters, to flatten them into one tensor and back."""

    def __init__(self, params: Params) -> None:
        self.names = list(params)
        self.shapes = [tuple(params[k].shape) for k in self.names]
        self.sizes = [params[k].numel() for k in self.names]

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    def flatten(self, tensors: Params, out: Tensor | None = None) -> Tensor:
        """One flat tensor; written into ``out`` (``numel`` elements, any device) if given."""
        parts = [tensors[k].reshape(-1) for k in self.names]
        return torch.cat(parts) if out is None else torch.cat(parts, out=out)

    def unflatten(self, flat: Tensor) -> Params:
        parts = torch.split(flat, self.sizes)
        return {k: p.view(s) for k, p, s in zip(self.names, parts, self.shapes)}


class TaskProgram(Protocol):
    """What an engine calls on the task program of a worker (``distmaml.run.runner.TaskRunner``)."""

    device: torch.device
    dtype: torch.dtype
    layout: ParamLayout
    batching: str

    def choose_batching(self, tasks: int) -> str: ...
    def batching_report(self) -> dict[str, Any]: ...
    def batching_line(self) -> str: ...
    def meta_grad(self, flat: Tensor, step: int, ids: Sequence[int], out: Tensor | None = None) -> GradShard: ...
    def evaluate(self, flat: Tensor, split: str, ids: Sequence[int], steps: int) -> EvalShard: ...


class Engine(Protocol):
    """What the trainer asks of an engine (``engine.InProcessEngine``, ``engine.ray_engine.RayEngine``)."""

    workers: int
    replacements: int

    def meta_batch(self, flat: Tensor, step: int, batch_size: int) -> GradShard: ...
    def evaluate(self, flat: Tensor, split: str, tasks: int, steps: int) -> EvalShard: ...
    def batching(self) -> dict[str, Any]: ...
    def close(self) -> None: ...
