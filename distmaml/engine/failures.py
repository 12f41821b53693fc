"""Lost workers said in a few words: why Ray says a worker died, and where the run's losses happened.

Both engines replace a lost worker and stop after ``engine.max_worker_failures``
losses; the line that stops the run names the last loss's reason and every
place a loss happened (``start-up x3``), so a worker that dies again and again
at the same point (a crash, memory that can never fit) reads as such.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

STARTUP = "start-up"
"""Where a worker builds its task program, times ``batching: auto`` or compiles (``batching: compiled``)."""


def death_reason(error: BaseException) -> str:
    """Ray's reason for a dead actor in one sentence ("The actor is dead because its worker process has
    died"), or the error's class name when it gives none. Ray's own message spans several lines."""
    text = str(error)
    because = next((line.strip() for line in text.splitlines() if " because " in line), "")
    sentence = because.split(". ")[0].rstrip(".")
    return sentence[:200] or type(error).__name__


def failure_places(events: Iterable[Mapping[str, Any]]) -> str:
    """Where the losses happened, in order of first occurrence: ``start-up x3`` or ``meta-step 4, meta-test``."""
    counts = Counter(str(e["during"]) for e in events)
    return ", ".join(f"{place} x{n}" if n > 1 else place for place, n in counts.items())
