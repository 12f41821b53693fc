"""What a worker may still allocate, and what a computation needed: the measurements ``batching: auto`` fits by.

``available(device)`` is the memory a worker may still use, with a margin:

* CPU: the least of the machine's ``MemAvailable`` (``/proc/meminfo``), what
  the process's cgroup (v2 ``memory.max`` minus ``memory.current``, or v1's
  ``limit_in_bytes`` minus ``usage_in_bytes``) leaves, and what an address-space
  limit (``RLIMIT_AS``) leaves of this process's virtual size; then
  ``MARGIN`` of it is kept back.
* GPU: the device's free memory (``torch.cuda.mem_get_info``), less the margin.

Workers that share a node's memory (or a GPU) plan with their part of it:
the engines tell each worker how many distmaml workers share its node and its
device (``share``), and the free memory is divided by that count. Without it,
two workers measuring at once would each count all of it.

``DISTMAML_WORKER_MEMORY`` (bytes, or with a ``K``/``M``/``G`` suffix) caps it,
per worker: for memory other programs on the node will need, and for tests.

``peak(run, device)`` runs ``run()`` and returns the memory it added at its
peak: on a GPU ``torch.cuda.max_memory_allocated`` after a reset; on a CPU the
process's resident high-water mark (``VmHWM``), reset first by writing ``5`` to
``/proc/self/clear_refs`` (Linux 4.0+), after freed heap memory went back to
the kernel (``malloc_trim``) so that the computation's pages show as new ones.

``allocation_limit(extra)`` makes an allocation of more than ``extra`` bytes
beyond the process's present size fail, on a CPU, with ``torch.OutOfMemoryError``
instead of a visit from the kernel's OOM killer (no traceback, an empty log): it
lowers ``RLIMIT_AS`` for the duration. Virtual size counts reservations that
are not resident yet, so it errs towards refusing. The limit holds for every
thread of the process, so it leaves ``THREADS_ROOM`` of address space beyond
``extra`` to the others (Ray's, Ray Train's health checks).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from distmaml.errors import CANNOT_GO_ON, DistmamlError

MARGIN = 0.1
"""Share of the available memory kept back (the runtime's own allocations, other processes' growth)."""

THREADS_ROOM = 256 << 20
"""Address space ``allocation_limit`` leaves, beyond what the limited computation may take, to the process's
other threads: Ray's gRPC and core-worker threads, Ray Train's health checks, the courier. The limit is the
whole process's, and each new thread reserves a stack (8 MiB) and may reserve a malloc arena (64 MiB, mapped
as 128 MiB while aligned). Without room, those threads fail: gRPC printed ``pthread_create failed`` in a Ray
Train worker's measurement, and in one CI run Ray Train ended the group during it and started it again.
Reservations, mostly never resident."""

ENV_LIMIT = "DISTMAML_WORKER_MEMORY"
"""Environment variable: the most memory (bytes, or ``512M``, ``8G``) a worker believes it has."""

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_CGROUP = Path("/sys/fs/cgroup")


def parse_bytes(text: str) -> int:
    """``"512M"`` -> 536870912; a plain number is bytes."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1:] if t[-1:] in _UNITS and not t[-1:].isdigit() else ""
    try:
        return int(float(t[: len(t) - len(unit)]) * _UNITS[unit])
    except ValueError:
        raise ValueError(f"{ENV_LIMIT} = {text!r}: expected bytes, e.g. 8G or 512M") from None


def human(n: float) -> str:
    """Bytes for a reader: ``1.5 GiB``, ``230 MiB``."""
    if n >= 1 << 30:
        return f"{n / (1 << 30):.1f} GiB"
    return f"{n / (1 << 20):.0f} MiB"


def _status(key: str) -> int | None:
    """A ``/proc/self/status`` field in bytes (``VmRSS``, ``VmHWM``, ``VmSize``), None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2's "max": no limit


def _cgroup_room() -> int | None:
    """What this process's cgroup lets it still allocate, None without a limit."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if controllers == "":  # v2: one hierarchy; a limit may sit on any ancestor
            rooms = []
            folder = _CGROUP / rel.lstrip("/")
            while True:
                limit, used = _read_int(folder / "memory.max"), _read_int(folder / "memory.current")
                if limit is not None and used is not None:
                    rooms.append(limit - used)
                if folder == _CGROUP or _CGROUP not in folder.parents:
                    break
                folder = folder.parent
            if rooms:
                return min(rooms)
        elif "memory" in controllers.split(","):
            folder = _CGROUP / "memory" / rel.lstrip("/")
            limit = _read_int(folder / "memory.limit_in_bytes")
            used = _read_int(folder / "memory.usage_in_bytes")
            if limit is not None and used is not None and limit < 1 << 60:  # v1's "no limit" is a huge number
                return limit - used
    return None


def _mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _address_space_room() -> int | None:
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    size = _status("VmSize")
    if soft == resource.RLIM_INFINITY or size is None:
        return None
    return soft - size


def cpu_room() -> int | None:
    """What this process may still allocate on the CPU before the margin, None where nothing says."""
    rooms = [r for r in (_mem_available(), _cgroup_room(), _address_space_room()) if r is not None]
    return max(0, min(rooms)) if rooms else None


def budget(free: int | None, cap: int | None = None) -> int | None:
    """The bytes a worker plans with: ``free`` less ``MARGIN``, at most ``cap``; None when neither is known.

    The one rule for every device: the GPU path passes ``torch.cuda.mem_get_info``'s
    free bytes, the CPU path ``cpu_room()``.
    """
    planned = None if free is None else int(free * (1 - MARGIN))
    if cap is not None:
        planned = cap if planned is None else min(planned, cap)
    return planned


def env_cap() -> int | None:
    text = os.environ.get(ENV_LIMIT, "").strip()
    return parse_bytes(text) if text else None


_SHARED_BY = {"cpu": 1, "cuda": 1}


def share(node: int, gpu: int = 1) -> None:
    """This process is one of ``node`` distmaml workers on its node, one of ``gpu`` on its GPU: ``available``
    gives it that part of the free memory. Set by the engines in each worker before it measures."""
    _SHARED_BY.update(cpu=max(1, int(node)), cuda=max(1, int(gpu)))


def shared_by(device: torch.device) -> int:
    """How many workers split ``device``'s free memory in this process's plan (``share``)."""
    return _SHARED_BY["cuda" if device.type == "cuda" else "cpu"]


def available(device: torch.device) -> int | None:
    """The memory a worker on ``device`` may still use, margin applied, its part where workers share it
    (module docstring); None: unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return budget(free // _SHARED_BY["cuda"], env_cap())
    room = cpu_room()
    return budget(None if room is None else room // _SHARED_BY["cpu"], env_cap())


def _trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def peak(run: Callable[[], object], device: torch.device) -> int | None:
    """The memory ``run()`` added at its peak on ``device`` (bytes); None where it cannot be measured."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - before)
    _trim()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # the high-water mark starts again from the RSS
    except OSError:
        run()
        return None
    rss = _status("VmRSS")
    run()
    high = _status("VmHWM")
    return None if rss is None or high is None else max(0, high - rss)


@contextlib.contextmanager
def allocation_limit(device: torch.device, extra: int | None) -> Iterator[None]:
    """On a CPU, allocations beyond ``extra`` more bytes fail with ``torch.OutOfMemoryError`` inside the block
    (beyond ``extra`` and ``THREADS_ROOM``: the limit is the process's, and its other threads keep running).

    Nothing is limited on a GPU (its allocator raises that error itself), when
    ``extra`` is None, or where ``RLIMIT_AS`` cannot be lowered.
    """
    size = _status("VmSize")
    if device.type != "cpu" or extra is None or size is None:
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = size + extra + THREADS_ROOM
    if soft != resource.RLIM_INFINITY and soft <= limit:
        yield  # a lower limit is already set
        return
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    try:
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ValueError, OSError):
        yield
        return
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        _trim()


class MemoryFitError(DistmamlError, RuntimeError):
    """Not even one task fits in the worker's memory: the run cannot go on; the message gives the fixes."""

    exit_code = CANNOT_GO_ON


def refusal(
    need: int | None, budget: int, device: torch.device, *, first_order: bool, recompute: bool
) -> MemoryFitError:
    """The one line of a worker in which one task of the run does not fit (``need`` None: more than ``budget``)."""
    estimate = f"about {human(need)}" if need is not None else f"more than {human(budget)}"
    fixes = [
        *([] if recompute else ["inner.recompute=true"]),
        *([] if first_order else ["algorithm=fomaml"]),
        "fewer data.queries",
    ]
    return MemoryFitError(
        f"one task of this run needs {estimate} of memory (batching loop, measured) but a worker on {device} "
        f"has {human(budget)}; set {', '.join(fixes)}, or run on a node with more memory"
    )
