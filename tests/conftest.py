import atexit
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# Loopback only: Ray (in this process, Cluster's nodes, and every process started from here) takes 127.0.0.1
# as its node address instead of the address of the default route (tests/rayhead.py, LOOPBACK_ONLY).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Ray Train's controller looks at its worker group every 2 s by default and takes several looks from a
# group's last report to the end of fit(); distmaml's groups look every 0.5 s (engine.elastic.POLL_SECONDS)
# unless this is exported, and the tests look every 0.2 s (every Ray process they start inherits this
# environment). A worker that misses looks is still given Ray Train's own timeout
# (RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S, unchanged).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")

# One torch (OpenMP) thread in every process the tests start (CLI runs, bench and Tune subprocesses, Ray
# workers that do not pin their own), as in this one (below): two pytest workers run side by side on the
# machine's 2 cores, and a process on torch's default of a thread per core oversubscribes them, its OpenMP
# threads spinning on cores the other test computes on. Measured here: two `distmaml train --workers 0`
# runs of glyphs_5w1s at once took 70-93 s on the default threads, 22.6 s on one each. A process that asks
# for threads (engine.cpus_per_worker, bench --threads) still gets them.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Decoded splits (distmaml.data.splitcache) and copies of stores from buckets go to a cache folder of
# this session, inherited by the Ray workers and subprocesses the tests start, not to ~/.cache/distmaml.
if "DISTMAML_CACHE" not in os.environ:
    os.environ["DISTMAML_CACHE"] = tempfile.mkdtemp(prefix="distmaml-test-cache-")
    atexit.register(shutil.rmtree, os.environ["DISTMAML_CACHE"], True)


@pytest.fixture
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


# One torch thread per test process: Ray workers started by the tests run beside
# it on the same two cores, and oversubscribed threads slow conv nets many-fold.
torch.set_num_threads(1)


def _ray_loggers() -> dict[str, logging.Logger]:
    return {
        name: lg
        for name, lg in logging.root.manager.loggerDict.items()
        if (name == "ray" or name.startswith("ray.")) and isinstance(lg, logging.Logger)
    }


@pytest.fixture(autouse=True)
def _ray_log_handlers_of_a_test_end_with_it():
    """``ray.init`` inside a test adds a StreamHandler bound to the sys.stderr of that moment, which
    is the test's capture (capsys) and is closed when the test ends; a later Ray log line would then
    print a "Logging error" traceback into another test's stderr. Drop what the test added."""
    before = {name: list(lg.handlers) for name, lg in _ray_loggers().items()}
    yield
    for name, lg in _ray_loggers().items():
        lg.handlers = [h for h in lg.handlers if h in before.get(name, [])]


# -- loopback only --------------------------------------------------------------------------------------
# Tests may reach 127.0.0.0/8 only (tests/test_loopback.py). Every socket this pytest process connects,
# binds or sends to is checked here (Python's audit events); one to any other address, or a bind to all
# interfaces, fails the session at its end, naming the address.
_OFF_LOOPBACK: list[str] = []


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False  # a host name other than localhost: it may resolve anywhere
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


def _audit_sockets(event: str, args: tuple) -> None:
    if event not in ("socket.connect", "socket.bind", "socket.sendto"):
        return
    address = args[-1]
    if isinstance(address, tuple) and address and isinstance(address[0], str) and not _is_loopback(address[0]):
        _OFF_LOOPBACK.append(f"{event} {address!r}")


import sys as _sys  # noqa: E402

_sys.addaudithook(_audit_sockets)


_CHECKED = [0]


@pytest.fixture(autouse=True)
def _loopback_only():
    """Each test ends failed if this process reached off loopback since the last check (a module fixture's
    connections count at its first test): also where pytest-xdist's workers run the tests, whose end of
    session below does not set the suite's outcome."""
    yield
    new = _OFF_LOOPBACK[_CHECKED[0] :]
    _CHECKED[0] = len(_OFF_LOOPBACK)
    if new:
        pytest.fail(f"reached addresses off loopback (only 127.0.0.0/8 is allowed): {sorted(set(new))}")


def pytest_sessionfinish(session, exitstatus):
    if _OFF_LOOPBACK:
        print(f"\ntests reached addresses off loopback (only 127.0.0.0/8 is allowed): {sorted(set(_OFF_LOOPBACK))}")
        session.exitstatus = 1


FILE_SECONDS = json.loads((Path(__file__).parent / "durations.json").read_text())
"""Seconds each test file took in one run of the suite, its quick tests and its end-to-end (``slow``) ones
apart (``ci/durations.py`` writes it from pytest's ``--durations=0`` output)."""
GUESS_SECONDS = {False: 0.5, True: 20.0}
"""A test of a file the table does not have yet: a quick one, an end-to-end one."""


@pytest.hookimpl(trylast=True)  # after ``-m`` and ``-k`` have deselected: the items that will run
def pytest_collection_modifyitems(session, config, items):
    """The longest files first, each file's own order kept: in pytest-xdist's workers (``ci/test.sh``: ``-n 2
    --dist loadfile --no-loadscope-reorder``) the long ones start at once and the short ones fill in beside
    them, instead of one long file starting last while the other worker has nothing left. A file's length
    is its measured time (``FILE_SECONDS``, the parts selected). Without ``--no-loadscope-reorder``
    pytest-xdist orders the files by their number of tests instead, which put a few long files last.
    In one process (no pytest-xdist worker) the order stays the files' own."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    parts: dict[str, dict[bool, int]] = {}
    for item in items:
        slow = item.get_closest_marker("slow") is not None
        counts = parts.setdefault(item.nodeid.split("::")[0], {False: 0, True: 0})
        counts[slow] += 1

    def seconds(path: str) -> float:
        known = FILE_SECONDS.get(path)
        total = 0.0
        for slow, n in parts[path].items():
            if n:
                total += known["slow" if slow else "quick"] if known else n * GUESS_SECONDS[slow]
        return total

    weight = {path: seconds(path) for path in parts}
    first = {path: i for i, path in enumerate(parts)}
    items.sort(key=lambda item: (-weight[item.nodeid.split("::")[0]], first[item.nodeid.split("::")[0]]))
