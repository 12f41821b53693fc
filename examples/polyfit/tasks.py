"""A task family distmaml has never seen: y = a x^2 + b x + c with a, b, c drawn per task.

The contract (``data.family: polyfit.tasks:Quadratics``): ``Quadratics(config)``
has ``loss`` and ``sample(split, step, task_ids)`` returning
``(support_x, support_y, query_x, query_y)``, task dimension first, as a pure
function of its arguments: each task draws from a generator seeded by
(config seed, split, step, task id) alone, so every worker rebuilds the same
task from its id, whatever else it samples.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

SPLITS = {"train": 0, "val": 1, "test": 2}


class Quadratics:
    """K support and Q query points per task, x uniform in [-2, 2], coefficients uniform in [-1, 1]."""

    loss = "mse"

    def __init__(self, config) -> None:  # type: ignore[no-untyped-def]
        self.seed = config.seed
        self.shots = config.data.shots
        self.queries = config.data.queries

    def _task(self, split: str, step: int, task_id: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        g = torch.Generator().manual_seed(((self.seed * 3 + SPLITS[split]) * 1_000_003 + step) * 1_000_003 + task_id)
        a, b, c = torch.rand(3, generator=g) * 2 - 1
        x = torch.rand(self.shots + self.queries, 1, generator=g) * 4 - 2
        y = a * x**2 + b * x + c
        return x[: self.shots], y[: self.shots], x[self.shots :], y[self.shots :]

    def sample(self, split: str, step: int, task_ids: Sequence[int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        # val and test tasks are fixed sets (step 0), train tasks change every meta-step
        tasks = [self._task(split, step if split == "train" else 0, int(i)) for i in task_ids]
        return tuple(torch.stack(part) for part in zip(*tasks))  # type: ignore[return-value]
