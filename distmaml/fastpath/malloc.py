"""A process that computes meta-gradients keeps the memory it frees, for its next step (glibc's malloc).

Every meta-step allocates and frees the same large tensors: a conv4 task's
activations are megabytes each. glibc serves an allocation above its mmap
threshold (128 kB at first, raised as blocks are freed, at most 32 MiB) with
a fresh ``mmap`` and unmaps it on free; freed heap memory beyond its trim
threshold goes back to the kernel too. Either way the next step faults the
same pages in again, each one zeroed by the kernel. Measured on the
omniglot bench config (conv4-64, 16 tasks, one thread): about 85,000 minor
page faults per meta-step, 340 MB zeroed; with ``keep_freed_memory`` none.
Two workers on one node pay it twice over, since zeroing pages is memory
traffic both compete for.

``keep_freed_memory`` sets both thresholds to 1 GiB with ``mallopt``: a
process then holds on to the peak of what a step used (the RSS stays at the
step's high-water mark instead of falling between steps) and reuses it.

A thread other than the main one allocates from its own arena, a chain of
heaps of at most 64 MiB, and glibc unmaps a heap of it that frees up
entirely whatever the trim threshold; only a top pad of 64 MiB (memory an
arena may keep beyond its top, reserved, resident only once used) stops
that. A Ray Train worker computes in such a thread: with the thresholds
alone it still took about 45,000 faults a step, with the pad too about
none. Blocks of more than 64 MiB in such a thread, and of more than 1 GiB
anywhere, are still mapped and unmapped per use.

Only in processes distmaml owns: ``mallopt`` changes the whole process for
good, so ``claim`` marks the processes that are distmaml's own (the
``distmaml`` command, its Ray worker actors, its collective group's workers,
its Tune trials), and the assembly keeps freed memory only there
(``keep_freed_memory_if_claimed``). A notebook or script that calls
``distmaml.train(workers=0)`` or builds a runner keeps glibc's defaults.

The environment wins: when it sets glibc's malloc tunables
(``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ... or
``GLIBC_TUNABLES`` with ``glibc.malloc.``), nothing is changed. The bench's
memory measurements rely on that (``bench.EXACT_RSS``), and it is how a
user keeps glibc's defaults: ``MALLOC_TRIM_THRESHOLD_=131072``.
"""

from __future__ import annotations

import ctypes
import os
import platform

KEEP_BYTES = 1 << 30
"""Blocks below this are kept by the process when freed and served from its heap."""

TOP_PAD_BYTES = 64 << 20
"""An arena keeps this much beyond its top: a thread's heap (64 MiB at most) is then never unmapped."""

_M_TRIM_THRESHOLD = -1  # glibc's malloc.h
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

_kept: bool | None = None  # this process's outcome, once decided
_claimed = False


def environment_sets_malloc() -> bool:
    """Whether this process's environment sets any of glibc's malloc tunables."""
    return any(k.startswith("MALLOC_") and k.endswith("_") for k in os.environ) or "glibc.malloc." in os.environ.get(
        "GLIBC_TUNABLES", ""
    )


def keep_freed_memory() -> bool:
    """Makes this process keep freed memory below ``KEEP_BYTES`` for reuse (see the module's docstring).

    Idempotent; returns whether the process keeps it: False where the C
    library is not glibc or the environment sets malloc's tunables itself.

    Example:
        >>> keep_freed_memory()  # once, before the first meta-step (``keep_freed_memory_if_claimed``)
        True
    """
    global _kept
    if _kept is None:
        _kept = False
        if is_available():
            try:
                libc = ctypes.CDLL("libc.so.6")
                settings = (
                    (_M_MMAP_THRESHOLD, KEEP_BYTES),
                    (_M_TRIM_THRESHOLD, KEEP_BYTES),
                    (_M_TOP_PAD, TOP_PAD_BYTES),
                )
                _kept = all(libc.mallopt(option, value) == 1 for option, value in settings)
            except (OSError, AttributeError):  # no such library or function: malloc stays as it is
                pass
    return _kept


def is_available() -> bool:
    """Whether this process could keep freed memory: Linux with glibc, and no malloc tunables in the environment."""
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc" and not environment_sets_malloc()


def claim() -> None:
    """Marks this process as distmaml's own: its malloc settings are distmaml's to change."""
    global _claimed
    _claimed = True


def keep_freed_memory_if_claimed() -> bool:
    """``keep_freed_memory()`` in a process distmaml owns (see ``claim``); elsewhere nothing; returns the outcome."""
    return keep_freed_memory() if _claimed else bool(_kept)
