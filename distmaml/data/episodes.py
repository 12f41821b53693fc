"""N-way K-shot episodes over a task store.

A task of split s at meta-step t with id i draws, from a generator seeded by
(seed, s, t, i) alone, N classes of the split's pool without replacement,
then K + Q images of each class without replacement: the first K are the
class's support images, the other Q its queries. The class drawn j-th gets
label j, so labels are shuffled per task. Support is ``x_T(NK)CHW``, ordered
by label; queries likewise ``x_T(NQ)CHW``.

Each split is read once, on first use, as one uint8 tensor: mapped from the
node's cache file (``splitcache``), so the workers of a node share one copy;
a batch of tasks is one gather from it, converted to float in [0, 1] (or
normalised with the meta-train mean and std) only at sample time.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from distmaml.data.errors import DataError
from distmaml.data.splitcache import shared_split
from distmaml.data.store import SplitData, StoreInfo, load_split, open_store
from distmaml.tasks.base import SPLITS
from distmaml.tasks.seeding import task_generator
from distmaml.typing import TaskBatch


def choose_distinct(n: int, k: int, g: torch.Generator) -> Tensor:
    """``k`` distinct integers of ``range(n)``, uniformly, in random order.

    Floyd's algorithm on ``k`` uniform draws, then a random order: O(k), where
    a ``randperm(n)`` costs O(n) (a tenth of the sampler's time at Omniglot's
    4400 meta-train classes).
    """
    u = torch.rand(2 * k, generator=g, dtype=torch.float64).tolist()
    chosen: list[int] = []
    seen: set[int] = set()
    for i, j in enumerate(range(n - k, n)):
        t = min(int(u[i] * (j + 1)), j)
        pick = j if t in seen else t
        seen.add(pick)
        chosen.append(pick)
    order = sorted(range(k), key=lambda i: u[k + i])
    return torch.tensor([chosen[i] for i in order], dtype=torch.int64)


class ImageTasks:
    """The ``TaskFamily`` of few-shot image classification over a task store.

    Args:
        path: a store folder written by ``distmaml prepare``.
        ways: classes per task (N).
        shots: support images per class (K).
        queries: query images per class (Q).
        seed: the run's seed; tasks are a pure function of (seed, split, step, id).
        normalize: subtract the meta-train mean and divide by its std per
            channel instead of scaling to [0, 1].
        shared: map each split from the node's cache file, one copy for all
            the node's workers (``splitcache.shared_split``); False reads a
            private copy into this process. The tasks are the same.

    Example:
        >>> tasks = ImageTasks("data/omniglot", ways=5, shots=1, queries=15)
        >>> batch = tasks.sample("train", step=0, task_ids=range(32))
        >>> batch.support_x.shape, batch.query_y.shape
        (torch.Size([32, 5, 1, 28, 28]), torch.Size([32, 75]))
    """

    loss = "cross_entropy"

    def __init__(
        self,
        path: str | Path,
        *,
        ways: int,
        shots: int,
        queries: int,
        seed: int = 0,
        normalize: bool = False,
        shared: bool = True,
    ) -> None:
        self.info: StoreInfo = open_store(path)
        self.ways, self.shots, self.queries, self.seed = ways, shots, queries, seed
        self.normalize, self.shared = normalize, shared
        self._splits: dict[str, SplitData] = {}
        self._check()

    def _check(self) -> None:
        where = f"task store {self.info.path}"
        for split, info in self.info.splits.items():
            if self.ways > len(info.classes):
                raise DataError(
                    f"data.ways = {self.ways} exceeds the {len(info.classes)} classes of split {split!r} "
                    f"of {where}; lower data.ways"
                )
            name, count = info.smallest()
            if self.shots + self.queries > count:
                raise DataError(
                    f"data.shots + data.queries = {self.shots + self.queries} exceeds the {count} images of class "
                    f"{name!r} (split {split!r} of {where}); lower one of them"
                )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.info.image_shape

    def split(self, split: str) -> SplitData:
        """The split in memory, mapped from the node's cache (or read privately) on first use."""
        if split not in SPLITS:
            raise ValueError(f"split {split!r}: allowed values are {', '.join(SPLITS)}")
        if split not in self._splits:
            read = shared_split if self.shared else load_split
            self._splits[split] = read(self.info, split)
        return self._splits[split]

    def task_indices(self, split: str, step: int, task_id: int) -> Tensor:
        """Row indices ``[ways, shots + queries]`` into the split's images; row j is label j."""
        data = self.split(split)
        g = task_generator(self.seed, split, step, task_id)
        n_classes = len(data.classes)
        classes = choose_distinct(n_classes, self.ways, g)
        counts = data.counts[classes]
        # K + Q distinct images per class: the smallest K + Q of uniform keys, padding rows masked out
        keys = torch.rand(self.ways, int(counts.max()), generator=g)
        keys.masked_fill_(torch.arange(keys.shape[1])[None, :] >= counts[:, None], 2.0)
        picks = torch.topk(keys, self.shots + self.queries, dim=1, largest=False, sorted=True).indices
        return data.offsets[classes][:, None] + picks

    def sample(self, split: str, step: int, task_ids: Sequence[int]) -> TaskBatch:
        """Tasks ``task_ids`` of meta-step ``step``: ``x`` float32 ``[T, N*K|N*Q, C, H, W]``, ``y`` int64."""
        data = self.split(split)
        index = torch.stack([self.task_indices(split, step, i) for i in task_ids])  # [T, N, K+Q]
        t, n, k = len(index), self.ways, self.shots
        pixels = data.images[index.view(-1)].view(t, n, k + self.queries, *self.image_shape)
        x = self._to_float(pixels)
        support_x = x[:, :, :k].reshape(t, n * k, *self.image_shape)
        query_x = x[:, :, k:].reshape(t, n * self.queries, *self.image_shape)
        labels = torch.arange(n)
        support_y = labels.repeat_interleave(k).expand(t, -1).contiguous()
        query_y = labels.repeat_interleave(self.queries).expand(t, -1).contiguous()
        return TaskBatch(support_x, support_y, query_x, query_y)

    def _to_float(self, pixels: Tensor) -> Tensor:
        x = pixels.float().div_(255)
        if self.normalize:
            shape = (-1, 1, 1)
            mean = torch.tensor(self.info.mean, dtype=x.dtype).view(shape)
            std = torch.tensor(self.info.std, dtype=x.dtype).view(shape)
            x = (x - mean) / std
        return x
