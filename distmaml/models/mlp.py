"""Fully connected network; the MAML paper's sinusoid regressor is 1-40-40-1."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


class MLP(nn.Module):
    """``Linear``/``ReLU`` stack: ``in_features -> hidden... -> out_features``."""

    def __init__(self, in_features: int, hidden: Sequence[int], out_features: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, out_features))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def sinusoid_mlp() -> MLP:
    """The MAML paper's regressor: 1-40-40-1 with ReLU."""
    return MLP(1, (40, 40), 1)
