"""Networks meta-trained by distmaml: the MAML paper's MLP and 4-conv net, and the few-shot ResNet-12."""

from distmaml.models.conv4 import Conv4
from distmaml.models.mlp import MLP, sinusoid_mlp
from distmaml.models.registry import IMAGE_MODELS, MODELS, build_model
from distmaml.models.resnet12 import ResNet12

__all__ = ["IMAGE_MODELS", "MLP", "MODELS", "Conv4", "ResNet12", "build_model", "sinusoid_mlp"]
