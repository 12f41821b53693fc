"""The functional core: inner and outer loop of MAML with ``torch.func``.

Imports torch only (no Ray, MLflow or pyarrow; a test checks it).
"""

from distmaml.core.algorithm import ALGORITHMS, Algorithm, MamlppOptions, init_algorithm_params
from distmaml.core.batching import choose_batching
from distmaml.core.batchnorm import MetaBatchNorm, batch_norm, batchnorm_implementation
from distmaml.core.inner import InnerLoop, adapt
from distmaml.core.losses import LOSSES, METRIC_NAME
from distmaml.core.outer import MetaGradient, MetaGradSum, meta_grad, meta_gradient, task_objective
from distmaml.core.program import TaskProgram

__all__ = [
    "ALGORITHMS",
    "LOSSES",
    "METRIC_NAME",
    "Algorithm",
    "InnerLoop",
    "MetaBatchNorm",
    "MamlppOptions",
    "MetaGradSum",
    "MetaGradient",
    "TaskProgram",
    "adapt",
    "batch_norm",
    "batchnorm_implementation",
    "choose_batching",
    "init_algorithm_params",
    "meta_grad",
    "meta_gradient",
    "task_objective",
]
