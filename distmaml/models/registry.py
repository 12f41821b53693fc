"""The registry of built-in networks: ``model.name`` -> builder. Config validates ``model.name`` against it
and the run's assembly builds from it; a new network is one entry here (and in ``IMAGE_MODELS`` if it
takes images)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from distmaml.models.conv4 import Conv4
from distmaml.models.mlp import MLP
from distmaml.models.resnet12 import ResNet12

MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": lambda *, in_features, out_features, hidden, **_: MLP(in_features, hidden, out_features),
    "conv4": lambda *, out_features, in_channels, image_size, filters, **_: Conv4(
        out_features, in_channels, image_size, filters
    ),
    "resnet12": lambda *, out_features, in_channels, image_size, filters, **_: ResNet12(
        out_features, in_channels, image_size, filters
    ),
}

IMAGE_MODELS = ("conv4", "resnet12")
"""The registered networks that take images (``in_channels``, ``image_size``, ``filters``); the others
take vectors (``in_features``, ``hidden``)."""


def build_model(name: str, **kwargs: object) -> nn.Module:
    """``build_model("conv4", out_features=5, in_channels=1, image_size=28, filters=64)``."""
    if name not in MODELS:
        raise ValueError(f"model.name = {name!r}: allowed values are {sorted(MODELS)}")
    return MODELS[name](**kwargs)
