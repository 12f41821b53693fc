"""Who computes a meta-batch: the driver process itself, or Ray actors.

Only this layer knows about processes; it moves flat tensors and task ids and
never knows what MAML is (the ``TaskRunner`` does, through ``core``).
"""

from distmaml.engine.local import InProcessEngine
from distmaml.engine.shard import EvalShard, GradShard, ParamLayout, TaskRunner, balanced_ranges

__all__ = ["EvalShard", "GradShard", "InProcessEngine", "ParamLayout", "TaskRunner", "balanced_ranges"]
