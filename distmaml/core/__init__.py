"""The functional core: inner and outer loop of MAML with ``torch.func``.

Imports torch only (no Ray, MLflow or pyarrow; a test checks it).
"""

from distmaml.core.batching import choose_batching
from distmaml.core.batchnorm import MetaBatchNorm, batch_norm, batchnorm_implementation
from distmaml.core.inner import InnerLoop, adapt
from distmaml.core.losses import LOSSES, METRIC_NAME
from distmaml.core.outer import MetaGradient, MetaGradSum, meta_grad, meta_gradient, task_objective

__all__ = [
    "LOSSES",
    "METRIC_NAME",
    "InnerLoop",
    "MetaBatchNorm",
    "MetaGradSum",
    "MetaGradient",
    "adapt",
    "batch_norm",
    "batchnorm_implementation",
    "choose_batching",
    "meta_grad",
    "meta_gradient",
    "task_objective",
]
