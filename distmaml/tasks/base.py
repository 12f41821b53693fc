"""What every task family provides."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from distmaml.typing import TaskBatch

SPLITS = ("train", "val", "test")
"""Meta-train, meta-validation and meta-test: disjoint tasks (or classes)."""


class TaskFamily(Protocol):
    """A source of tasks: ``sample(split, step, ids)`` is a pure function."""

    @property
    def loss(self) -> str:
        """``"cross_entropy"`` or ``"mse"``."""
        ...

    def sample(self, split: str, step: int, task_ids: Sequence[int]) -> TaskBatch:
        """The tasks ``task_ids`` of meta-step ``step`` from ``split``, task dimension first."""
        ...
