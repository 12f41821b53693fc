"""Sinusoid regression (Finn et al., 2017, section 5.1).

A task is ``y = A sin(x - phi)`` with amplitude A ~ U[0.1, 5.0] and phase
phi ~ U[0, pi]; inputs x ~ U[-5, 5]. K support and K query points per task
(``queries`` may differ from ``shots``). The three splits draw from the same
distribution with different streams, so meta-test tasks are held out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from distmaml.tasks.seeding import derive_seed
from distmaml.typing import TaskBatch

AMPLITUDE = (0.1, 5.0)
PHASE = (0.0, math.pi)
X_RANGE = (-5.0, 5.0)


@dataclass(frozen=True)
class SinusoidTasks:
    """K-shot sinusoid regression tasks; tensors are float64 ``x_TK1``."""

    shots: int
    queries: int
    seed: int = 0
    loss: str = "mse"

    def _draw(self, split: str, step: int, task_ids: Sequence[int]) -> tuple[torch.Tensor, ...]:
        """Amplitudes ``amp_T``, phases ``phase_T``, inputs ``x_TK1`` and outputs ``y_TK1`` (support then
        query points) of tasks ``task_ids``.

        Only the draws are per task, each from its own stream (``derive_seed``)
        into a row: the amplitude's and phase's two numbers, then the inputs'.
        The arithmetic then runs once over the batch, element by element, so a
        task's numbers do not depend on the others in the batch. Sampling 13
        tasks took 417 us task by task, 104 us so: the arithmetic on each task's
        small tensors had cost more than its draws.
        """
        k = self.shots + self.queries
        u_T2K = torch.empty(len(task_ids), 2 + k, dtype=torch.float64)
        g = torch.Generator()
        for row, i in zip(u_T2K, task_ids):
            g.manual_seed(derive_seed(self.seed, split, step, i))
            torch.rand(2 + k, generator=g, dtype=torch.float64, out=row)
        amp_T = AMPLITUDE[0] + (AMPLITUDE[1] - AMPLITUDE[0]) * u_T2K[:, 0]
        phase_T = PHASE[0] + (PHASE[1] - PHASE[0]) * u_T2K[:, 1]
        x_TK1 = (X_RANGE[0] + (X_RANGE[1] - X_RANGE[0]) * u_T2K[:, 2:]).unsqueeze(-1)
        y_TK1 = amp_T.view(-1, 1, 1) * torch.sin(x_TK1 - phase_T.view(-1, 1, 1))
        return amp_T, phase_T, x_TK1, y_TK1

    def sample_one(self, split: str, step: int, task_id: int) -> tuple[torch.Tensor, ...]:
        """(amplitude, phase, support x, support y, query x, query y) of one task."""
        amp_T, phase_T, x_TK1, y_TK1 = self._draw(split, step, [task_id])
        k = self.shots
        return amp_T[0], phase_T[0], x_TK1[0, :k], y_TK1[0, :k], x_TK1[0, k:], y_TK1[0, k:]

    def sample(self, split: str, step: int, task_ids: Sequence[int]) -> TaskBatch:
        _, _, x_TK1, y_TK1 = self._draw(split, step, task_ids)
        s = self.shots
        return TaskBatch(*(t.contiguous() for t in (x_TK1[:, :s], y_TK1[:, :s], x_TK1[:, s:], y_TK1[:, s:])))
