"""The in-process engine: the driver computes every task itself.

The degenerate case of the Ray engine (one shard holding every task), kept
for debugging (``workers: 0``) and for the core's benchmark.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from distmaml.engine.protocol import EvalShard, GradShard, TaskProgram


class InProcessEngine:
    """Runs all shards in the calling process, on ``runner`` (``assembly.build_runner``)."""

    workers = 0
    replacements = 0

    def __init__(self, runner: TaskProgram, *, batch_size: int = 0) -> None:
        self.runner = runner
        if batch_size:  # batching: auto is timed, compiled is compiled, now rather than in the first meta-step
            runner.choose_batching(batch_size)

    def meta_batch(self, flat: Tensor, step: int, batch_size: int) -> GradShard:
        return self.runner.meta_grad(flat, step, range(batch_size))

    def evaluate(self, flat: Tensor, split: str, tasks: int, steps: int) -> EvalShard:
        return self.runner.evaluate(flat, split, range(tasks), steps)

    def batching(self) -> dict[str, Any]:
        """The batching used (with ``auto``, timed at start-up given ``batch_size``, else at the first
        meta-step; see ``TaskRunner.choose_batching``)."""
        return self.runner.batching_report()

    def close(self) -> None:
        pass
