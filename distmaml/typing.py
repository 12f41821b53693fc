"""Type names shared across distmaml (one place, as TorchOpt's typing.py)."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

Params = dict[str, Tensor]
"""Meta-parameters or adapted parameters: parameter name -> tensor."""


class TaskBatch(NamedTuple):
    """A batch of T tasks; every tensor carries the task dimension first.

    Shape suffixes used across the code: ``x_TK...`` is task, example, features.
    For classification ``y`` holds class indices (int64); for regression it holds
    targets shaped like the model's output.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor

    @property
    def num_tasks(self) -> int:
        return int(self.support_x.shape[0])

    def to(self, device: object | None = None, dtype: object | None = None) -> TaskBatch:
        """Moves the batch; floating inputs and regression targets take ``dtype``."""

        def move(t: Tensor) -> Tensor:
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype=dtype)  # type: ignore[call-overload]
            return t.to(device) if device is not None else t  # type: ignore[call-overload]

        return TaskBatch(*(move(t) for t in self))

    def task(self, i: int) -> TaskBatch:
        """Task ``i`` alone, keeping a task dimension of 1."""
        return TaskBatch(*(t[i : i + 1] for t in self))

    def slice(self, start: int, stop: int) -> TaskBatch:
        return TaskBatch(*(t[start:stop] for t in self))
