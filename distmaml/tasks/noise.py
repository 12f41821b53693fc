"""N-way K-shot tasks of random images: the shape of Omniglot without its data.

For benchmarks and engine tests of the convolutional path on any machine:
every image is uniform noise, labels are shuffled per task, and a task is a
pure function of (seed, split, step, task id) like every family's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from distmaml.tasks.seeding import task_generator
from distmaml.typing import TaskBatch


@dataclass(frozen=True)
class NoiseImageTasks:
    """Tensors ``x_TNCHW`` (N = ways x shots or ways x queries) and labels ``y_TN``."""

    ways: int
    shots: int
    queries: int
    channels: int = 1
    image_size: int = 28
    seed: int = 0
    loss: str = "cross_entropy"

    def sample(self, split: str, step: int, task_ids: Sequence[int]) -> TaskBatch:
        per_class = self.shots + self.queries
        sx, sy, qx, qy = [], [], [], []
        for i in task_ids:
            g = task_generator(self.seed, split, step, i)
            x = torch.rand(self.ways, per_class, self.channels, self.image_size, self.image_size, generator=g)
            labels = torch.randperm(self.ways, generator=g)  # class c gets label labels[c]
            y = labels[:, None].expand(self.ways, per_class)
            sx.append(x[:, : self.shots].flatten(0, 1))
            sy.append(y[:, : self.shots].flatten())
            qx.append(x[:, self.shots :].flatten(0, 1))
            qy.append(y[:, self.shots :].flatten())
        return TaskBatch(torch.stack(sx), torch.stack(sy), torch.stack(qx), torch.stack(qy))
