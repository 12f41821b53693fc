"""A small network of one's own: ``model.name: polyfit.nets:make``.

Built from torch.nn layers and a plain function, with torch's own
``nn.BatchNorm1d``: distmaml replaces it by its batch-statistics layer (MAML
normalises each task by its own examples; no running statistics are kept).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def swish(x: Tensor) -> Tensor:
    return x * torch.sigmoid(x)


class PolyNet(nn.Module):
    """x -> features (x, x^2) -> Linear -> BatchNorm1d -> swish -> Linear -> swish -> Linear."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.inp = nn.Linear(2, hidden)
        self.norm = nn.BatchNorm1d(hidden)
        self.mid = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = swish(self.norm(self.inp(torch.cat([x, x * x], dim=-1))))
        return self.head(swish(self.mid(h)))


def make(config) -> nn.Module:  # type: ignore[no-untyped-def]
    """``attr(config)``: the resolved config in, the network out (``model.hidden[0]`` wide)."""
    return PolyNet(config.model.hidden[0])
