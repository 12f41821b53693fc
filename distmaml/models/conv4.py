"""The 4-conv network of the MAML paper (after Vinyals et al., 2016).

Four blocks of 3x3 convolution, batch-norm with batch statistics, ReLU and 2x2
max-pool, then a linear head over the flattened features: 64 filters for
Omniglot (28x28 -> 1x1), 32 for miniImageNet (84x84 -> 5x5).

Each block pools before its ReLU. ReLU is monotone, so ``relu(maxpool(x))``
equals ``maxpool(relu(x))`` and routes the same gradient (to first and second
order: a window whose maximum is not positive gets zero gradient either way);
but the ReLU and its backward then touch a quarter of the elements. In
``distmaml bench`` (omniglot shape, 1 thread) this order made the meta-step
about 17% faster, with gradients equal to the last bit. The baseline
(``distmaml.bench.baseline``) keeps the paper's order, so the tests check the two
against each other.
"""

from __future__ import annotations

from torch import Tensor, nn

from distmaml.core.batchnorm import MetaBatchNorm


def _spatial_after_blocks(size: int, blocks: int) -> int:
    for _ in range(blocks):
        size //= 2
    return size


class Conv4(nn.Module):
    """``x_NCHW -> logits_NW`` with ``ways`` outputs."""

    def __init__(
        self, ways: int, in_channels: int = 1, image_size: int = 28, filters: int = 64, blocks: int = 4
    ) -> None:
        super().__init__()
        side = _spatial_after_blocks(image_size, blocks)
        if side < 1:
            raise ValueError(
                f"image size {image_size} is too small for {blocks} max-pool blocks; use at least {2**blocks}"
            )
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(blocks):
            layers += [
                nn.Conv2d(channels, filters, 3, padding=1),
                MetaBatchNorm(filters),
                nn.MaxPool2d(2),
                nn.ReLU(),
            ]
            channels = filters
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(filters * side * side, ways)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).flatten(1))
