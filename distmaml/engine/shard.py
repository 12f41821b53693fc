"""How a meta-batch is split into shards: balanced contiguous ranges of task ids.

A shard's work is the ``TaskRunner``'s (``distmaml.runner``); this layer only
decides which worker computes which ids, and adds what comes back.
"""

from __future__ import annotations


def balanced_ranges(total: int, parts: int) -> list[range]:
    """Splits ``range(total)`` into ``parts`` contiguous ranges differing in length by at most one."""
    base, extra = divmod(total, parts)
    out, start = [], 0
    for i in range(parts):
        stop = start + base + (1 if i < extra else 0)
        out.append(range(start, stop))
        start = stop
    return out
