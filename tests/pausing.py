"""The pause-and-act handshake of the tests that disturb a run at a chosen moment (kill a worker, remove
or add a node, signal the driver).

The paused process writes ``FOLDER/ready-...`` holding its PID and waits for
``FOLDER/go-PID``. Two kinds of process pause this way: rank 0 of a collective
group at a step (``tests/test_elastic.py``'s ``PauseAt`` callback), and any
worker at a named point of its life (``distmaml.engine.testpoints``: start-up,
batching, ``step:N``, validation, meta-test), planned with ``plan``.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from distmaml.engine.testpoints import ENV


def plan(folder: Path, point: str, action: str = "pause", times: int = 1) -> None:
    """The first ``times`` workers to reach ``point`` pause there (or crash: ``action="crash"``).
    The workers must carry ``DISTMAML_TEST_POINTS=folder`` (``points_env``) from their start."""
    (folder / f"at-{point}").write_text(f"{action} {times}")


def clear(folder: Path) -> None:
    """Drops every plan and handshake file: the next test plans afresh."""
    for f in folder.iterdir():
        f.unlink()


def points_env(folder: Path) -> dict[str, str]:
    return {ENV: str(folder)}


def act_at_pause(folder: Path, act: Any, seen: set[str], alive: Any = lambda: True) -> bool:
    """Waits for the next pause (a ``ready-*`` not in ``seen``), notes the time in ``acted``,
    ``act(pid)``, lets it go on. False if no pause came within 300 s or ``alive()`` turned false."""
    deadline = time.monotonic() + 300
    while not (ready := [p for p in folder.glob("ready-*") if p.name not in seen]):
        if time.monotonic() > deadline or not alive():
            return False
        time.sleep(0.05)
    pid = int(ready[0].read_text())
    with open(folder / "acted", "a") as f:
        f.write(f"{time.time()}\n")
    act(pid)
    (folder / f"go-{pid}").write_text("")
    seen.add(ready[0].name)
    return True


def disturb(folder: Path, act: Any, times: int = 1) -> threading.Thread:
    """In the background: each time a process is ready, ``act_at_pause``."""

    def run() -> None:
        seen: set[str] = set()
        for _ in range(times):
            if not act_at_pause(folder, act, seen):
                return

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def kill(pid: int) -> None:
    """SIGKILL to ``pid``; returns once it is gone (or after 10 s)."""
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)


def acted_at(folder: Path) -> list[float]:
    """When each act happened (``time.time()``)."""
    return [float(x) for x in (folder / "acted").read_text().split()]
