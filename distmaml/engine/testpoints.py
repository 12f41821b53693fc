"""Named points in a worker's life where a test pauses the worker or crashes it.

A worker's death is only worth testing where it really happens (while it
starts, times its batching, computes step 5, meta-tests), and a test that waits
for that moment with a sleep is a flaky test. So the engines mark those moments:
``point("startup")``, ``point("batching")``, ``point("step:5")``,
``point("validation")``, ``point("meta_test")``, and in a collective group's
rank 0 ``point("stop_seen")``, once the driver's stop request has reached it.
With ``DISTMAML_TEST_POINTS`` unset (always, outside tests) a point costs one
environment lookup.

With ``DISTMAML_TEST_POINTS=FOLDER`` in the workers' environment (a test sets
it before it starts Ray: every worker inherits it) a point looks for a plan file
``FOLDER/at-NAME`` holding ``pause N`` or ``crash N``. The first N workers to
reach the point (each claims one of N ``claimed-NAME-i`` files) then:

* ``pause``: write ``FOLDER/ready-NAME-PID`` (the text is the PID) and wait for
  ``FOLDER/go-PID`` (the protocol of ``tests/pausing.py``: the test kills the
  worker by its PID, or lets it go on);
* ``crash``: SIGKILL themselves, as a segfault or the kernel's OOM killer would.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

ENV = "DISTMAML_TEST_POINTS"
"""The folder of plans and handshakes; unset: every point does nothing."""
WAIT = 600.0
"""Seconds a paused worker waits for its ``go`` file before it goes on anyway."""


def point(name: str) -> None:
    """Pauses or crashes this process at ``name`` when a test planned it (see the module's docstring)."""
    folder = os.environ.get(ENV)
    if not folder:
        return
    _act(Path(folder), name)


def eval_point(split: str) -> None:
    """``point("validation")`` or ``point("meta_test")`` for an evaluation of ``split`` (val, test)."""
    if os.environ.get(ENV):
        point({"val": "validation", "test": "meta_test"}.get(split, f"eval:{split}"))


def _act(folder: Path, name: str) -> None:
    try:
        action, times = (folder / f"at-{name}").read_text().split()
    except (FileNotFoundError, ValueError):
        return
    if not _claim(folder, name, int(times)):
        return
    pid = os.getpid()
    if action == "crash":
        os.kill(pid, signal.SIGKILL)
    ready = folder / f"ready-{name}-{pid}"
    partial = folder / f".ready-{name}-{pid}"
    partial.write_text(str(pid))
    partial.rename(ready)  # the test never reads a half-written PID
    deadline = time.monotonic() + WAIT
    while not (folder / f"go-{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.02)


def _claim(folder: Path, name: str, times: int) -> bool:
    """Whether this process is one of the first ``times`` to reach ``name`` (one ``claimed`` file each)."""
    for i in range(times):
        try:
            with open(folder / f"claimed-{name}-{i}", "x") as f:
                f.write(str(os.getpid()))
            return True
        except FileExistsError:
            continue
    return False
