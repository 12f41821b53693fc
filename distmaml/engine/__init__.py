"""Who computes a meta-batch: the driver process itself, or Ray actors.

Only this layer knows about processes; it receives a ready task program (a
``TaskRunner``, or on Ray a function that builds one in each worker), moves
flat tensors and task ids, and never knows what MAML is.
"""

from distmaml.engine.local import InProcessEngine
from distmaml.engine.shard import balanced_ranges

__all__ = ["InProcessEngine", "balanced_ranges"]
