"""Scoring adaptation: each task's query metric before and after adaptation.

Used for meta-validation and meta-test. Adaptation here needs first-order
gradients only (nothing is differentiated through it), so no graph is kept.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.func import vmap

from distmaml.core.algorithm import Algorithm, InnerLoop, as_algorithm
from distmaml.core.batching import COMPILED
from distmaml.core.outer import batched_model
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
        batching: as ``meta_grad``'s; ``compiled`` scores by ``batched`` (no
            second-order graph here: compiling it would not pay).
    """
    algorithm = as_algorithm(inner)
    if batching == COMPILED:
        batching = "batched"
    mode, net = batched_model(model, batch, batching)
    program = TaskProgram(net, algorithm, channels_last=mode == "loop_channels_last", batched=mode == "batched")
    if program.per_step and steps > algorithm.inner.steps:
        warnings.warn(
            f"inner.test_steps = {steps} exceeds the {algorithm.inner.steps} inner steps of meta-training: "
            "the steps past them reuse the last step's per-step parameters (learned rates, batch-norm)",
            stacklevel=2,
        )
    theta = {k: v.detach() for k, v in params.items()}

    def score(p: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> tuple[Tensor, Tensor]:
        return program.scores(p, sx, sy, qx, qy, steps)

    befores, afters = [], []
    if mode == "batched":
        for start in range(0, batch.num_tasks, chunk):
            b, a = score(theta, *batch.slice(start, start + chunk))
            befores.append(b)
            afters.append(a)
    elif mode == "vmap":
        for start in range(0, batch.num_tasks, chunk):
            part = batch.slice(start, start + chunk)
            b, a = vmap(score, in_dims=(None, 0, 0, 0, 0))(theta, *part)
            befores.append(b)
            afters.append(a)
    else:
        for t in range(batch.num_tasks):
            b, a = score(theta, *(x[t] for x in batch))
            befores.append(b.reshape(1))
            afters.append(a.reshape(1))
    return TaskScores(torch.cat(befores).detach(), torch.cat(afters).detach())
