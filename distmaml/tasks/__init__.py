"""Task families: each samples the tasks of a meta-step as a pure function of
(seed, split, step, task id), so any split of a meta-batch across workers
sees the same tasks."""

from distmaml.tasks.base import SPLITS, TaskFamily
from distmaml.tasks.seeding import derive_seed, task_generator
from distmaml.tasks.sinusoid import SinusoidTasks

__all__ = ["SPLITS", "SinusoidTasks", "TaskFamily", "derive_seed", "task_generator"]
