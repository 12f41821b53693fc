"""How a meta-batch is split into shards: balanced contiguous ranges of task ids.

A shard's work is the ``TaskRunner``'s (``distmaml.run.runner``); this layer only
decides which worker computes which ids, and adds what comes back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def balanced_ranges(total: int, parts: int) -> list[range]:
    """Splits ``range(total)`` into ``parts`` contiguous ranges differing in length by at most one."""
    base, extra = divmod(total, parts)
    out, start = [], 0
    for i in range(parts):
        stop = start + base + (1 if i < extra else 0)
        out.append(range(start, stop))
        start = stop
    return out


def common_batching(reports: Sequence[dict[str, Any]]) -> str | None:
    """With ``batching: auto``: the candidate with the least seconds summed over the workers' timings.

    ``reports`` are the workers' ``TaskRunner.batching_report()``. Every worker
    then computes with the choice, so that shards of one step come from the
    same computation (rounding included) whatever each timed. None when no
    worker timed (a fixed batching).
    """
    timed = [b["seconds"] for b in reports if b["seconds"]]
    if not timed:
        return None
    names = set.intersection(*(set(t) for t in timed))
    return min(sorted(names), key=lambda n: sum(t[n] for t in timed))
