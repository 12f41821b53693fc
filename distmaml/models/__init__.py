"""Networks meta-trained by distmaml: the MAML paper's MLP and 4-conv net."""

from distmaml.models.conv4 import Conv4
from distmaml.models.mlp import MLP, sinusoid_mlp
from distmaml.models.registry import MODELS, build_model

__all__ = ["MLP", "MODELS", "Conv4", "build_model", "sinusoid_mlp"]
