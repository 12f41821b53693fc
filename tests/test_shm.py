"""``engine.shm.SharedSum``: the collective group's per-step sum through shared memory, in real processes.

Each test starts W processes joined by a gloo group (as Ray Train joins its
workers); they sum buffers through ``SharedSum`` and compare with gloo's
``all_reduce`` and with a float64 sum computed here.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distmaml.engine import shm

pytestmark = pytest.mark.skipif(not shm.supported(3, 4096), reason="SharedSum needs x86-64 Linux with /dev/shm")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _buffers(rank: int, call: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * call + rank)
    return torch.randn(n, generator=g, dtype=torch.float64).to(dtype)


def _sum_worker(rank: int, world: int, port: int, n: int, calls: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    assert shm.uses_shared_memory(world, 8 * n)
    summer = shm.SharedSum(rank, world, n, torch.float64)
    results = []
    for call in range(calls):
        if rank == 1 and call % 7 == 3:
            time.sleep(0.01)  # one worker late now and then: the others wait, then sum alike
        mine = _buffers(rank, call, n, torch.float64)
        by_gloo = mine.clone()
        summer.all_reduce(mine)
        dist.all_reduce(by_gloo)
        results.append((mine, by_gloo))
    torch.save(results, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_every_worker_holds_the_same_sum_as_gloo_and_float64(tmp_path):
    """3 workers, 40 calls (both slot sets, many times over): every worker's sum is bit-identical to the
    others', agrees with gloo's all_reduce and with a float64 sum to rounding; nothing is left in /dev/shm."""
    world, n, calls = 3, 1001, 40
    before = set(os.listdir("/dev/shm"))
    mp.spawn(_sum_worker, args=(world, _free_port(), n, calls, str(tmp_path)), nprocs=world)
    assert {f for f in set(os.listdir("/dev/shm")) - before if f.startswith("distmaml-sum-")} == set()
    results = [torch.load(tmp_path / f"{r}.pt") for r in range(world)]
    for call in range(calls):
        expected = sum(_buffers(r, call, n, torch.float64) for r in range(world))
        ours = [results[r][call][0] for r in range(world)]
        for r in range(1, world):
            assert torch.equal(ours[r], ours[0]), f"call {call}: rank {r} holds another sum than rank 0"
        torch.testing.assert_close(ours[0], expected, rtol=0, atol=1e-12)
        torch.testing.assert_close(results[0][call][1], expected, rtol=0, atol=1e-12)


def _orphan_worker(rank: int, world: int, port: int, out: str) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    summer = shm.SharedSum(rank, world, 16, torch.float32)
    buffer = torch.ones(16)
    summer.all_reduce(buffer)  # both take part once
    if rank == 1:
        Path(out, "ready").write_text(str(os.getpid()))
        time.sleep(600)  # killed here, never takes part again
    began = time.perf_counter()
    try:
        summer.all_reduce(buffer)
    except shm.PeerGone as e:
        Path(out, "error").write_text(f"{time.perf_counter() - began:.2f} {e}")


def test_a_worker_that_dies_ends_the_others_wait(tmp_path):
    """Worker 1 is SIGKILLed while worker 0 waits for its slot: worker 0 raises PeerGone naming it within
    seconds (Ray Train then restarts the group) instead of waiting forever."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_orphan_worker, args=(r, 2, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 60
    while not (tmp_path / "ready").exists():
        assert time.monotonic() < deadline, "worker 1 never got ready"
        time.sleep(0.05)
    time.sleep(0.3)  # worker 0 is waiting by now
    os.kill(int((tmp_path / "ready").read_text()), signal.SIGKILL)
    procs[0].join(30)
    procs[1].join(5)
    assert procs[0].exitcode == 0
    seconds, message = (tmp_path / "error").read_text().split(" ", 1)
    assert float(seconds) < 10
    assert message.startswith("worker 1 (pid ") and "ended during a shared-memory sum" in message


def test_the_node_sum_setting_is_checked(monkeypatch):
    from distmaml.cluster.placement import EngineError

    monkeypatch.setenv("DISTMAML_NODE_SUM", "nccl")
    with pytest.raises(
        EngineError, match=r"DISTMAML_NODE_SUM = 'nccl': allowed values are 'shm' \(the default\) and 'gloo'"
    ):
        shm.node_sum_setting()
    monkeypatch.setenv("DISTMAML_NODE_SUM", "gloo")
    assert shm.node_sum_setting() == "gloo"


def test_too_large_a_mapping_is_left_to_gloo():
    assert shm.supported(2, 1 << 20)
    assert not shm.supported(2, shm.MAX_BYTES)  # two slot sets of it would not fit
