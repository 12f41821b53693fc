"""Batch-norm that always normalises with the statistics of the batch it sees.

MAML adapts and evaluates every task with the statistics of that task's own
examples (no running statistics), so this layer has weight and bias but no
buffers: it is a pure function of its input and parameters, which is what
``torch.func.functional_call`` and ``vmap`` need.

Two implementations give the same values and gradients:

* ``explicit``: mean and variance written as tensor ops. Its second-order
  gradient is right under ``vmap`` (torch 2.14's native batch-norm gave a wrong
  second-order gradient under ``vmap``; ``tests/test_batchnorm.py`` checks ours
  in float64 against finite differences and a loop).
* ``native``: ``torch.nn.functional.batch_norm`` with ``training=True`` and no
  running statistics: one fused kernel, fewer saved intermediates. Used on the
  per-task loop path, where no ``vmap`` is involved.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_IMPLEMENTATIONS = ("explicit", "native")
_current = "explicit"


@contextmanager
def batchnorm_implementation(name: str) -> Iterator[None]:
    """Selects the batch-norm implementation for code run inside the block."""
    global _current
    if name not in _IMPLEMENTATIONS:
        raise ValueError(f"batch-norm implementation {name!r}: allowed {_IMPLEMENTATIONS}")
    previous, _current = _current, name
    try:
        yield
    finally:
        _current = previous


def batch_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    """Normalises ``x_NC...`` over every dimension but the channel one (dim 1)."""
    if _current == "native":
        return F.batch_norm(x, None, None, weight, bias, training=True, eps=eps)
    dims = [0, *range(2, x.dim())]
    mean = x.mean(dim=dims, keepdim=True)
    centred = x - mean
    var = (centred * centred).mean(dim=dims, keepdim=True)
    shape = [1, -1] + [1] * (x.dim() - 2)
    return centred * torch.rsqrt(var + eps) * weight.view(shape) + bias.view(shape)


class MetaBatchNorm(nn.Module):
    """Batch-norm with batch statistics only, for 1-d (N, C) or 2-d (N, C, H, W) inputs."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: Tensor) -> Tensor:
        return batch_norm(x, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, batch statistics only"
