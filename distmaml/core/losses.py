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


def is_classification(name: str) -> bool:
    return name == "cross_entropy"


__all__ = ["LOSSES", "METRIC_NAME", "is_classification", "loss_fn", "metric", "torch"]
