"""Scoring adaptation: each task's query metric before and after adaptation.

Used for meta-validation and meta-test. Adaptation here needs first-order
gradients only (nothing is differentiated through it), so no graph is kept.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.func import vmap

from distmaml.core.algorithm import Algorithm, as_algorithm
from distmaml.core.batching import BATCHINGS, choose_batching
from distmaml.core.batchnorm import batchnorm_implementation
from distmaml.core.inner import InnerLoop
from distmaml.core.program import TaskProgram
from distmaml.typing import Params, TaskBatch


class TaskScores(NamedTuple):
    """Per-task query metric (accuracy or MSE) without and with adaptation, shape ``[T]``."""

    before: Tensor
    after: Tensor


def score_tasks(
    model: nn.Module,
    params: Params,
    batch: TaskBatch,
    inner: InnerLoop | Algorithm,
    steps: int,
    *,
    batching: str = "auto",
    chunk: int = 100,
) -> TaskScores:
    """Adapts each task with ``steps`` inner steps and scores its query set.

    Args:
        inner: the algorithm (an ``InnerLoop`` alone means MAML); its learned
            rates and per-step batch-norm are used, the last step's past the
            training steps.
        chunk: tasks per ``vmap`` call, bounding memory on long evaluations.
    """
    mode = choose_batching(model, batch.support_x.device) if batching == "auto" else batching
    if mode not in BATCHINGS:
        raise ValueError(f"batching = {mode!r}: allowed values are 'auto', {', '.join(map(repr, BATCHINGS))}")
    program = TaskProgram(
        model, as_algorithm(inner), channels_last=mode == "loop_channels_last", batched=mode == "batched"
    )
    theta = {k: v.detach() for k, v in params.items()}

    def score(p: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> tuple[Tensor, Tensor]:
        return program.scores(p, sx, sy, qx, qy, steps)

    befores, afters = [], []
    if mode == "batched":
        with batchnorm_implementation("explicit"):
            for start in range(0, batch.num_tasks, chunk):
                b, a = score(theta, *batch.slice(start, start + chunk))
                befores.append(b)
                afters.append(a)
    elif mode == "vmap":
        with batchnorm_implementation("explicit"):
            for start in range(0, batch.num_tasks, chunk):
                part = batch.slice(start, start + chunk)
                b, a = vmap(score, in_dims=(None, 0, 0, 0, 0))(theta, *part)
                befores.append(b)
                afters.append(a)
    else:
        with batchnorm_implementation("native"):
            for t in range(batch.num_tasks):
                b, a = score(theta, *(x[t] for x in batch))
                befores.append(b.reshape(1))
                afters.append(a.reshape(1))
    return TaskScores(torch.cat(befores).detach(), torch.cat(afters).detach())
