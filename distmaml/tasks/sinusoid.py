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

from distmaml.tasks.seeding import derive_seed, task_generator
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

    def sample_one(self, split: str, step: int, task_id: int) -> tuple[torch.Tensor, ...]:
        """(amplitude, phase, support x, support y, query x, query y) of one task."""
        g = task_generator(self.seed, split, step, task_id)
        u = torch.rand(2, generator=g, dtype=torch.float64)
        amp = AMPLITUDE[0] + (AMPLITUDE[1] - AMPLITUDE[0]) * u[0]
        phase = PHASE[0] + (PHASE[1] - PHASE[0]) * u[1]
        x = X_RANGE[0] + (X_RANGE[1] - X_RANGE[0]) * torch.rand(
            self.shots + self.queries, 1, generator=g, dtype=torch.float64
        )
        y = amp * torch.sin(x - phase)
        k = self.shots
        return amp, phase, x[:k], y[:k], x[k:], y[k:]

    def sample(self, split: str, step: int, task_ids: Sequence[int]) -> TaskBatch:
        """The tasks ``task_ids``, equal bit for bit to stacking ``sample_one``'s.

        Only the draws are per task, each from its own stream into a row; the
        arithmetic then runs once over the batch (the same operations in the same
        order, element by element). Sampling 13 tasks took 417 us task by task:
        the arithmetic on each task's small tensors cost more than its draws.
        """
        k = self.shots + self.queries
        u_T2K = torch.empty(len(task_ids), 2 + k, dtype=torch.float64)
        g = torch.Generator()
        for row, i in zip(u_T2K, task_ids):
            g.manual_seed(derive_seed(self.seed, split, step, i))
            torch.rand(2 + k, generator=g, dtype=torch.float64, out=row)  # sample_one's two draws, in one
        amp_T11 = (AMPLITUDE[0] + (AMPLITUDE[1] - AMPLITUDE[0]) * u_T2K[:, 0]).view(-1, 1, 1)
        phase_T11 = (PHASE[0] + (PHASE[1] - PHASE[0]) * u_T2K[:, 1]).view(-1, 1, 1)
        x_TK1 = (X_RANGE[0] + (X_RANGE[1] - X_RANGE[0]) * u_T2K[:, 2:]).unsqueeze(-1)
        y_TK1 = amp_T11 * torch.sin(x_TK1 - phase_T11)
        s = self.shots
        return TaskBatch(*(t.contiguous() for t in (x_TK1[:, :s], y_TK1[:, :s], x_TK1[:, s:], y_TK1[:, s:])))
