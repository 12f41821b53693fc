"""The functional core: inner and outer loop of MAML with ``torch.func``.

Imports torch only (no Ray, MLflow or pyarrow; a test checks it). The one
inner loop is ``core.program.TaskProgram``; ``core.outer`` and
``core.evaluate`` run it over a batch of tasks.
"""

from distmaml.core.algorithm import ALGORITHMS, Algorithm, InnerLoop, MamlppOptions, init_algorithm_params
from distmaml.core.batching import choose_batching
from distmaml.core.batchnorm import MetaBatchNorm, batch_norm, with_implementation
from distmaml.core.evaluate import TaskScores, score_tasks
from distmaml.core.losses import LOSSES, METRIC_NAME
from distmaml.core.outer import MetaGradient, MetaGradSum, meta_grad, meta_gradient
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
    "TaskScores",
    "batch_norm",
    "choose_batching",
    "init_algorithm_params",
    "meta_grad",
    "meta_gradient",
    "score_tasks",
    "with_implementation",
]
