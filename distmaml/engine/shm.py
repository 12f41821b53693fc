"""The per-step sum of a collective group whose workers share one node, through shared memory.

Measured on the 2-core VM this project is built on (torch 2.14, Python
3.11): a gloo ``all_reduce`` of a 7 KB buffer (the sinusoid MLP's gradient)
between two processes took 0.4-1.0 ms at the median and about 4 ms at the
90th percentile, while a round trip through a socket between the same two
processes took 30-45 us. A sinusoid meta-step computes in about a
millisecond, so gloo's latency alone undid a second worker. Gloo has since
gained a shared-memory all-reduce for processes on one host (pytorch/gloo
#455, #458); torch 2.14 does not ship it.

``SharedSum`` does the same for a group on one node (x86-64): the workers map
one file in ``/dev/shm`` (removed from the file system as soon as every
worker has it open, so nothing is left behind after a crash), each writes its
buffer into its own slot, publishes a counter, and waits for the others'
counters; then every worker adds the slots up in rank order, so all hold
the identical sum, bit for bit. Two sets of slots alternate, so a worker
may write call ``k + 1`` while a slower one still reads call ``k``. x86-64's
memory model keeps a worker's stores in order (the slot before the
counter), which the protocol relies on; other machines use gloo.

Waiting spins (yielding the CPU each time round), then sleeps in short
steps after 2 ms, so more workers than cores do not starve each other; every
half second it checks that the other workers' processes are alive and
raises if one is gone (Ray Train then restarts the group).
"""

from __future__ import annotations

import os
import platform
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from distmaml.cluster.placement import EngineError

SPIN_SECONDS = 0.002
"""How long a waiting worker spins (yielding) before it sleeps between looks."""
SLEEP_SECONDS = 0.0002
"""A look every this long once the spin is over."""
CHECK_SECONDS = 0.5
"""How often a waiting worker checks that the others' processes live."""
COUNTER_BYTES = 64
"""Each worker's counter on its own cache line."""
MAX_BYTES = 256 * 2**20
"""The largest mapping used (two slots per worker); a larger buffer, or one that would take over half
of ``/dev/shm``'s free space (a container's is often 64 MiB), is summed by gloo, whose latency does not
matter for buffers that large."""


def node_key() -> str:
    """What identifies this machine among a group's workers (host name and kernel boot id)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def mapping_bytes(world: int, nbytes: int) -> int:
    """Bytes of ``SharedSum``'s mapping for ``world`` workers and a buffer of ``nbytes``."""
    return world * COUNTER_BYTES + 2 * world * nbytes


def supported(world: int, nbytes: int) -> bool:
    """Whether this machine can sum a buffer of ``nbytes`` over ``world`` workers with ``SharedSum``: an
    x86-64 Linux whose ``/dev/shm`` has room for the mapping (at most ``MAX_BYTES``, half the free space)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        fs = os.statvfs("/dev/shm")
    except OSError:
        return False
    size = mapping_bytes(world, nbytes)
    return size <= MAX_BYTES and size <= fs.f_bavail * fs.f_frsize // 2


class PeerGone(RuntimeError):
    """Another worker's process ended while this one waited for its slot."""


class SharedSum:
    """Sums a flat CPU tensor of ``numel`` entries over the ``world`` workers of the current
    ``torch.distributed`` group, all on this node (collective: every rank constructs it).

    Args:
        rank, world: this worker's rank and the group's size.
        numel, dtype: the buffers summed by ``all_reduce``.
    """

    def __init__(self, rank: int, world: int, numel: int, dtype: torch.dtype) -> None:
        self.rank, self.world, self.numel = rank, world, numel
        item = torch.empty((), dtype=dtype).element_size()
        header = world * COUNTER_BYTES
        size = mapping_bytes(world, numel * item)
        name = [""]
        if rank == 0:
            fd, path = tempfile.mkstemp(prefix="distmaml-sum-", dir="/dev/shm")
            os.ftruncate(fd, size)
            os.close(fd)
            name[0] = path
        dist.broadcast_object_list(name, src=0)
        self.pids: list[int] = [0] * world
        dist.all_gather_object(self.pids, os.getpid())
        memory = torch.from_file(name[0], shared=True, size=size, dtype=torch.uint8)
        dist.barrier()  # every worker has it mapped: the name can go
        if rank == 0:
            os.unlink(name[0])
        self._counters = memory[:header].view(torch.int64).numpy()[:: COUNTER_BYTES // 8]
        self._slots = memory[header:].view(dtype).view(2, world, numel)
        self._calls = 0

    def all_reduce(self, buffer: Tensor) -> None:
        """Replaces ``buffer`` (``numel`` entries, contiguous, on the CPU) by its sum over the workers."""
        self._calls += 1
        k = self._calls
        slots = self._slots[k % 2]
        slots[self.rank].copy_(buffer)
        self._counters[self.rank] = k  # after the slot: x86-64 keeps the two stores in this order
        self._wait(k)
        buffer.copy_(slots[0])
        for j in range(1, self.world):
            buffer.add_(slots[j])

    def _wait(self, k: int) -> None:
        counters = self._counters
        start = check = time.perf_counter()
        while min(counters) < k:
            now = time.perf_counter()
            if now - start < SPIN_SECONDS:
                os.sched_yield()
                continue
            time.sleep(SLEEP_SECONDS)
            if now - check > CHECK_SECONDS:
                check = now
                self._check_peers(k)

    def _check_peers(self, k: int) -> None:
        for j, pid in enumerate(self.pids):
            if self._counters[j] >= k:
                continue
            if not _alive(pid):
                raise PeerGone(f"worker {j} (pid {pid}) ended during a shared-memory sum")


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, ended but not yet waited for by its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2 :].split(" ", 1)[0] not in ("Z", "X")


NODE_SUM = "DISTMAML_NODE_SUM"
"""Environment variable: ``shm`` (default) or ``gloo``, how a CPU group on one node sums."""


def node_sum_setting() -> str:
    """``DISTMAML_NODE_SUM``'s value (``shm`` if unset); anything else is the user's error."""
    wanted = os.environ.get(NODE_SUM, "shm")
    if wanted not in ("shm", "gloo"):
        raise EngineError(f"{NODE_SUM} = {wanted!r}: allowed values are 'shm' (the default) and 'gloo'")
    return wanted


def uses_shared_memory(world: int, nbytes: int) -> bool:
    """Whether a CPU group of ``world`` workers sums a buffer of ``nbytes`` through ``SharedSum``:
    every worker on this node, the machine ``supported``, and not turned off with
    ``DISTMAML_NODE_SUM=gloo`` (collective: every rank calls it)."""
    if world < 2:
        return False
    keys: list[tuple[str, bool] | None] = [None] * world
    dist.all_gather_object(keys, (node_key(), node_sum_setting() == "shm" and supported(world, nbytes)))
    return all(k is not None and k[1] for k in keys) and len({k[0] for k in keys if k is not None}) == 1


class GroupSum:
    """How a collective group's worker sums a flat buffer over the group: ``SharedSum`` when every
    worker is a CPU worker on this node (``uses_shared_memory``), else ``torch.distributed``'s
    ``all_reduce`` (gloo or NCCL); nothing with 1 worker. Collective: every rank constructs it.

    ``kind``: ``shm``, the backend's name, or ``none``.
    """

    def __init__(self, rank: int, world: int, numel: int, dtype: torch.dtype, device: torch.device) -> None:
        self._shared: SharedSum | None = None
        self.kind = "none"
        if world > 1:
            nbytes = numel * torch.empty((), dtype=dtype).element_size()
            if device.type == "cpu" and uses_shared_memory(world, nbytes):
                self._shared = SharedSum(rank, world, numel, dtype)
                self.kind = "shm"
            else:
                self.kind = str(dist.get_backend())

    def __call__(self, buffer: Tensor) -> None:
        """Replaces ``buffer`` by its sum over the group."""
        if self._shared is not None:
            self._shared.all_reduce(buffer)
        elif self.kind != "none":
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
