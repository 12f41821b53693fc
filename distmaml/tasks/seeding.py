"""Deterministic per-task random streams.

A task is identified by (seed, split, step, task id); its random numbers come
from a generator seeded by a hash of those four values, so task 7 of step 12
is the same tensor whichever worker samples it and whatever else that worker
samples before or after.
"""

from __future__ import annotations

import hashlib
import struct

import torch

from distmaml.tasks.base import SPLITS


def derive_seed(seed: int, split: str, step: int, task_id: int) -> int:
    """A 63-bit seed for one task, stable across processes, machines and versions."""
    payload = struct.pack("<qqqq", seed, SPLITS.index(split), step, task_id)
    return int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "little") >> 1


def task_generator(seed: int, split: str, step: int, task_id: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded for one task."""
    return torch.Generator().manual_seed(derive_seed(seed, split, step, task_id))
