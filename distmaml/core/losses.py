"""Task losses and the metric reported beside each (accuracy or MSE)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

LossFn = Callable[[Tensor, Tensor], Tensor]

LOSSES: dict[str, LossFn] = {
    "cross_entropy": F.cross_entropy,
    "mse": F.mse_loss,
}
METRIC_NAME = {"cross_entropy": "accuracy", "mse": "mse"}


def loss_fn(name: str) -> LossFn:
    """The loss called ``name``; a clear error names the allowed values."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"loss = {name!r}: allowed values are {sorted(LOSSES)}") from None


def metric(name: str, logits: Tensor, targets: Tensor, loss: Tensor) -> Tensor:
    """Accuracy for classification, the loss itself (MSE) for regression; no gradient."""
    if name == "cross_entropy":
        return (logits.detach().argmax(-1) == targets).to(logits.dtype).mean()
    return loss.detach()


def task_losses(name: str, out: Tensor, targets: Tensor) -> Tensor:
    """Each task's loss at once, task dimension first: ``loss_fn(name)`` per task, as a vector.

    Written with a task dimension rather than under ``vmap``: on the sinusoid
    MLP, whose meta-step is a few milliseconds of dispatch, vmap's wrapping
    of each call cost more than the arithmetic.
    """
    loss_fn(name)  # the clear error for an unknown name
    tasks = out.shape[0]
    if name == "cross_entropy":
        per_example = F.cross_entropy(out.flatten(0, -2), targets.flatten(), reduction="none")
        return per_example.view(tasks, -1).mean(1)
    return (out - targets).square().reshape(tasks, -1).mean(1)


def task_metrics(name: str, out: Tensor, targets: Tensor, losses: Tensor) -> Tensor:
    """``metric`` of each task at once (task dimension first), as a vector; no gradient."""
    if name == "cross_entropy":
        return (out.detach().argmax(-1) == targets).to(out.dtype).reshape(out.shape[0], -1).mean(1)
    return losses.detach()


def is_classification(name: str) -> bool:
    return name == "cross_entropy"


__all__ = ["LOSSES", "METRIC_NAME", "is_classification", "loss_fn", "metric", "task_losses", "task_metrics", "torch"]
