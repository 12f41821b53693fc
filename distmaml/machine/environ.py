"""Environment variables set for a block and put back as they were after it."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager


@contextmanager
def environ(values: Mapping[str, str]) -> Iterator[None]:
    """Within: ``os.environ`` holds ``values``; after: each of those variables is as it was (or unset again).

    Child processes started within inherit them (a ``spawn`` pool, Ray's
    driver-side settings read when a call starts).

    Example:
        >>> with environ({"MALLOC_MMAP_THRESHOLD_": "65536"}):
        ...     run_in_a_fresh_process()
    """
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
