"""Scoring adaptation: each task's query metric before and after adaptation.

Used for meta-validation and meta-test. Adaptation here needs first-order
gradients only (nothing is differentiated through it), so no graph is kept.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from distmaml.core.batching import choose_batching
from distmaml.core.batchnorm import batchnorm_implementation
from distmaml.core.inner import InnerLoop, adapt
from distmaml.core.losses import loss_fn, metric
from distmaml.typing import Params, TaskBatch


class TaskScores(NamedTuple):
    """Per-task query metric (accuracy or MSE) without and with adaptation, shape ``[T]``."""

    before: Tensor
    after: Tensor


def score_tasks(
    model: nn.Module,
    params: Params,
    batch: TaskBatch,
    inner: InnerLoop,
    steps: int,
    *,
    batching: str = "auto",
    chunk: int = 100,
) -> TaskScores:
    """Adapts each task with ``steps`` inner steps and scores its query set.

    Args:
        chunk: tasks per ``vmap`` call, bounding memory on long evaluations.
    """
    lossf = loss_fn(inner.loss)
    theta = {k: v.detach() for k, v in params.items()}

    def score(p: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> tuple[Tensor, Tensor]:
        def query_metric(q: Params) -> Tensor:
            out = functional_call(model, q, (qx,))
            return metric(inner.loss, out, qy, lossf(out, qy))

        adapted = adapt(model, p, sx, sy, inner, steps=steps, create_graph=False)
        return query_metric(p), query_metric(adapted)

    mode = choose_batching(model, batch.support_x.device) if batching == "auto" else batching
    befores, afters = [], []
    if mode == "vmap":
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
