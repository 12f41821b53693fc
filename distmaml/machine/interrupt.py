"""SIGTERM and SIGINT as a clean stop of ``distmaml train``.

A spot instance's notice, ``ray job stop`` and Ctrl-C reach the driver as
signals. Inside ``stop_on_signals()`` (entered by the CLI's ``train`` command,
in its main thread, and nowhere else) either one raises ``Interrupted`` at the
main thread's next Python instruction, also from inside a ``ray.get`` that
waits for a long meta-step, so the run does not wait for the step in flight:
the trainer saves the last completed step, the engine shuts its Ray processes
down and the CLI prints one line and exits with 128 + the signal number (130
for SIGINT, 143 for SIGTERM).

Three things shape it:

- An outer step is applied whole or not at all: a signal that arrives inside
  ``atomic()`` (the optimizer step with the step counter, a checkpoint write)
  is held until the block ends.
- ``Interrupted`` is a ``KeyboardInterrupt``: ``ray.get`` turns a
  KeyboardInterrupt raised by a signal handler into a new, plain one (and
  loses any other exception raised there until the result arrives), so the
  signal is also kept here, and ``stop_request`` recovers it.
- Ray's driver sets SIGTERM handlers of its own when it connects:
  ``ray.init``'s (``sys.exit``) and, in C, the core worker's failure-signal
  handler, which prints a stack dump and aborts. ``reinstall()`` runs after
  ``ray.init`` (``distmaml.cluster.connect.connect``) so that ours win.

Sweep trials and Ray workers never install these handlers (Tune stops a trial
itself, with SystemExit in ``report``); outside ``stop_on_signals`` ``atomic``
does nothing. Once a stop has begun, further signals are ignored, so the last
checkpoint and Ray's shutdown complete.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The run was stopped by ``signum``; the trainer fills in where it stopped and what it saved."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.step: int | None = None
        """Meta-steps completed when the run stopped (None: it stopped before training began)."""
        self.checkpoint: Any = None
        """The checkpoint holding that step, or None when the run has no directory."""
        self.run_dir: Any = None

    def __reduce__(self) -> tuple[Any, ...]:
        # A collective group's rank 0 stops with one and the driver raises it (a pickle in between):
        # keep the signal and where the run stopped, not only the name in ``args``.
        return _rebuild, (self.signum, self.step, self.checkpoint, self.run_dir)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        """128 + the signal number, as a shell reports a process ended by it: 130 SIGINT, 143 SIGTERM."""
        return 128 + self.signum


def _rebuild(signum: int, step: int | None, checkpoint: Any, run_dir: Any) -> Interrupted:
    stop = Interrupted(signum)
    stop.step, stop.checkpoint, stop.run_dir = step, checkpoint, run_dir
    return stop


class _State:
    installed = False
    previous: dict[int, Any] = {}
    received: int | None = None
    """The first signal received while installed."""
    depth = 0
    """Nesting of ``atomic`` blocks."""
    held = False
    """A signal arrived inside an ``atomic`` block and is raised when it ends."""


def _handler(signum: int, frame: FrameType | None) -> None:
    if _State.received is not None:
        return  # already stopping: let the checkpoint and the shutdown finish
    _State.received = signum
    if _State.depth:
        _State.held = True
        return
    raise Interrupted(signum)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def installed() -> bool:
    """Whether ``stop_on_signals`` handles SIGTERM and SIGINT in this process now."""
    return _State.installed


def reinstall() -> None:
    """Puts this module's handlers back after a library replaced them (``ray.init``); a no-op unless installed."""
    if _State.installed and _main_thread():
        for sig in SIGNALS:
            signal.signal(sig, _handler)


@contextmanager
def around_ray_init() -> Iterator[None]:
    """Wraps ``ray.init``: puts this module's handlers back after it, and turns a SIGTERM that struck
    during it (Ray's handler there calls ``sys.exit(15)``) into ``Interrupted``."""
    try:
        yield
    except SystemExit as e:
        if not _State.installed or e.code != signal.SIGTERM:
            raise
        _State.received = signal.SIGTERM
        raise Interrupted(signal.SIGTERM) from None
    reinstall()


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """For the block, SIGTERM and SIGINT raise ``Interrupted``; the previous handlers come back after it.

    Outside the main thread (where Python cannot set handlers) this does nothing.

    Example:
        >>> with stop_on_signals():
        ...     Trainer(cfg, engine, run_dir).fit()   # kill -TERM: Interrupted with .step and .checkpoint
    """
    if not _main_thread() or _State.installed:
        yield
        return
    _State.previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    _State.installed, _State.received, _State.held, _State.depth = True, None, False, 0
    reinstall()
    try:
        yield
    except KeyboardInterrupt as e:
        stop = stop_request(e)
        if stop is None or stop is e:
            raise
        raise stop from None  # the plain KeyboardInterrupt of a ray.get, before the trainer ran
    finally:
        _State.installed, _State.received = False, None
        for sig, previous in _State.previous.items():
            if previous is not None:  # None: set outside Python, cannot be restored from here
                signal.signal(sig, previous)


@contextmanager
def atomic() -> Iterator[None]:
    """A signal arriving inside the block is raised when the block ends, so the block is never half done."""
    _State.depth += 1
    try:
        yield
    finally:
        _State.depth -= 1
    if _State.depth == 0 and _State.held and _State.received is not None:
        _State.held = False
        raise Interrupted(_State.received)


def stop_request(error: BaseException) -> Interrupted | None:
    """The ``Interrupted`` behind ``error`` (as raised, or a plain KeyboardInterrupt from ``ray.get``).

    Asked inside ``stop_on_signals``. None when no signal reached this
    module's handlers: a KeyboardInterrupt
    with no handler of ours installed may have struck anywhere (inside an
    optimizer step), so nothing may be saved from it.
    """
    if isinstance(error, Interrupted):
        return error
    if isinstance(error, KeyboardInterrupt) and _State.received is not None:
        return Interrupted(_State.received)
    return None


def message(stop: Interrupted) -> str:
    """The one line the CLI prints: where the run stopped, what was saved and how to go on."""
    head = f"distmaml: stopped by {stop.name}"
    if stop.step is None:  # while starting; ``run_dir`` is set when it already holds a checkpoint (--resume)
        if stop.run_dir is None:
            return f"{head} before training began; nothing to save, start the run again"
        return f"{head} before training began; continue with: distmaml train --resume {stop.run_dir}"
    head += f" after meta-step {stop.step}"
    if stop.checkpoint is None:
        return f"{head}; nothing saved: without --out the run has no checkpoints (pass --out RUN_DIR to resume later)"
    return f"{head}; saved {stop.checkpoint}; continue with: distmaml train --resume {stop.run_dir}"
