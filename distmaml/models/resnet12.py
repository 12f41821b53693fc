"""ResNet-12, the few-shot backbone of TADAM and MetaOptNet, meta-trainable by MAML.

Layout (Oreshkin et al., 2018, "TADAM", section 4; Lee et al., 2019,
"MetaOptNet", section 4.1 and its 64-160-320-640 widths): four residual
blocks; each is three 3x3 convolutions (no bias: batch-norm follows), each
followed by batch-norm, with a leaky ReLU (slope 0.1) after the first two;
a 1x1 convolution and batch-norm on the shortcut; the sum goes through a
leaky ReLU and a 2x2 max-pool. 84x84 inputs leave 640 x 5 x 5 features,
flattened into a linear head (MetaOptNet's 16000-d embedding; MAML's conv4
flattens too). At 84x84 RGB, 5 ways: 12,504,325 parameters (12,424,320 in
the body, 80,005 in the head).

As in conv4, batch-norm is the core's ``MetaBatchNorm``: statistics of the
batch it sees, no running statistics, explicit or native implementation by
``with_implementation``. MetaOptNet's DropBlock is left out: its random masks
would make a task's gradient depend on more than (seed, step, task id).

Each block pools before its last leaky ReLU. The leaky ReLU is monotone
increasing, so ``lrelu(maxpool(x)) == maxpool(lrelu(x))`` with the same
gradient routing, and the activation then touches a quarter of the elements
(the tests compare with the papers' order, written out).

``filters`` sets the first block's width and the others follow the 64-160-320-640
ratios (2.5x, 5x, 10x): ``filters=64`` is the papers' network, ``filters=4``
(4-10-20-40) a tiny one for tests.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from distmaml.core.batchnorm import MetaBatchNorm

SLOPE = 0.1
"""Negative slope of the leaky ReLU (MetaOptNet)."""


def widths(filters: int) -> tuple[int, int, int, int]:
    """The four blocks' channels: ``(64, 160, 320, 640)`` for ``filters=64``."""
    return filters, filters * 5 // 2, filters * 5, filters * 10


class ResidualBlock(nn.Module):
    """``x_NCHW -> x_N(out)(H/2)(W/2)``: three conv-BN (leaky ReLU between), 1x1 conv-BN shortcut, pool."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn1 = MetaBatchNorm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = MetaBatchNorm(out_channels)
        self.conv3 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn3 = MetaBatchNorm(out_channels)
        self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), MetaBatchNorm(out_channels))
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        out = F.leaky_relu(self.bn1(self.conv1(x)), SLOPE)
        out = F.leaky_relu(self.bn2(self.conv2(out)), SLOPE)
        out = self.bn3(self.conv3(out)) + self.shortcut(x)
        return F.leaky_relu(self.pool(out), SLOPE)


class ResNet12(nn.Module):
    """``x_NCHW -> logits_NW`` with ``ways`` outputs; ``image_size`` at least 16 (four halvings)."""

    def __init__(self, ways: int, in_channels: int = 3, image_size: int = 84, filters: int = 64) -> None:
        super().__init__()
        side = image_size
        for _ in range(4):
            side //= 2
        if side < 1:
            raise ValueError(f"image size {image_size} is too small for resnet12's 4 max-pools; use at least 16")
        blocks: list[nn.Module] = []
        channels = in_channels
        for width in widths(filters):
            blocks.append(ResidualBlock(channels, width))
            channels = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(channels * side * side, ways)  # registered last: ANIL's head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(x).flatten(1))
