"""``batching: auto`` fits before it times: what loop needs for one task is measured, what cannot fit is skipped.

Real measurements on real networks: the worker's memory is capped with
``DISTMAML_WORKER_MEMORY`` (what a worker believes it has), and under that cap
``memory.allocation_limit`` also lowers the process's address-space limit, so a
task that cannot fit is an out-of-memory error in the process, not a kill.
"""

from __future__ import annotations

import errno
import mmap
import os
import re
import resource
import subprocess
import sys
import threading

import pytest
import torch

from distmaml.config import load_config
from distmaml.core.batching import expected_bytes, fit_candidates, is_out_of_memory
from distmaml.machine import memory
from distmaml.run.assembly import build_runner

CONV4 = [
    "data.family=noise",
    "data.queries=5",
    "model.filters=32",
    "tracking.enabled=false",
    "workers=0",
    "meta.batch_size=8",
]


def test_fit_is_one_rule_for_any_device_given_its_free_memory():
    """What the GPU path feeds (``torch.cuda.mem_get_info``'s free bytes) goes through the same two functions."""
    gib = 1 << 30
    assert memory.budget(10 * gib) == 9 * gib  # the margin
    assert memory.budget(10 * gib, cap=2 * gib) == 2 * gib and memory.budget(None, cap=gib) == gib
    assert memory.budget(None) is None
    names, skipped = fit_candidates(["loop", "loop_channels_last", "vmap", "batched"], gib, memory.budget(10 * gib), 3)
    assert names == ["loop", "loop_channels_last", "batched"]  # batched: 3 x 2 x 1 GiB; vmap: 3 x 4 x 1 GiB
    assert skipped == {"vmap": "needs about 12.0 GiB for 3 tasks at once, the worker has 9.0 GiB"}
    assert expected_bytes("loop", gib, 32) == gib  # one task at a time, whatever the shard
    assert fit_candidates(["loop", "vmap"], None, gib, 8) == (["loop", "vmap"], {})  # not measured: nothing skipped
    # torch's CPU allocator under an address-space limit raises a plain RuntimeError (measured: ResNet-12)
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 169 bytes"))
    assert is_out_of_memory(MemoryError()) and not is_out_of_memory(RuntimeError("a bug"))
    assert memory.parse_bytes("512M") == 512 << 20 and memory.parse_bytes("2G") == 2 * gib


def test_workers_sharing_a_node_or_a_gpu_split_its_free_memory(monkeypatch):
    """Two workers measuring at once on one node would each count all of its memory: each plans with its part
    (the engines call ``memory.share`` in every worker: tests/test_engine.py checks what they told it)."""
    gib = 1 << 30
    monkeypatch.delenv(memory.ENV_LIMIT, raising=False)
    monkeypatch.setattr(memory, "cpu_room", lambda: 10 * gib)  # the machine's room, whatever it is now
    cpu = torch.device("cpu")
    try:
        assert memory.available(cpu) == 9 * gib and memory.shared_by(cpu) == 1
        memory.share(2)
        assert memory.available(cpu) == 9 * gib // 2 and memory.shared_by(cpu) == 2
        assert memory.shared_by(torch.device("cuda", 0)) == 1  # one worker per GPU unless told
        monkeypatch.setenv(memory.ENV_LIMIT, "1G")  # the cap is per worker: not divided
        assert memory.available(cpu) == gib
        memory.share(4, gpu=2)
        assert memory.shared_by(torch.device("cuda", 0)) == 2
    finally:
        memory.share(1)


@pytest.mark.slow  # two timings of every conv4 candidate: about 2 min on a loaded 2-core machine
def test_auto_skips_a_candidate_that_cannot_fit_and_records_why(monkeypatch):
    monkeypatch.delenv(memory.ENV_LIMIT, raising=False)
    config = load_config("omniglot_5w1s", CONV4)
    free = build_runner(config)
    free.choose_batching(8)
    one = free.batching_report()["memory"]["one_task"]
    assert one > 0 and "vmap" in free.batching_report()["seconds"]  # plenty of memory: every candidate timed

    monkeypatch.setenv(memory.ENV_LIMIT, str(6 * one))  # loop's task fits; vmap's 8 tasks at once cannot
    capped = build_runner(config)
    capped.choose_batching(8)
    report = capped.batching_report()
    assert report["memory"]["budget"] == 6 * one and report["memory"]["shard"] == 8
    assert report["skipped"]["vmap"].startswith("needs about ") and "for 8 tasks at once" in report["skipped"]["vmap"]
    assert "vmap" not in report["seconds"] and "loop" in report["seconds"]
    assert report["choice"] in report["seconds"]
    assert "vmap skipped: needs about" in capped.batching_line()


def test_the_address_space_limit_stops_a_big_allocation_not_the_process_s_other_threads():
    """The limit is the whole process's: another thread (in a Ray worker, gRPC's or a Ray Train health check)
    still starts and maps memory, while a mapping past the room fails. Without the room, this thread could not
    start, gRPC's threads failed to start in a Ray Train worker's measurement, and in one CI run Ray Train
    ended the group during it and started it again. Anonymous mappings always take new address space (torch's
    allocations may reuse heap that a long-lived process such as this test's already holds)."""
    cpu = torch.device("cpu")
    beyond = memory.THREADS_ROOM + (64 << 20)
    mapped: list[int] = []

    def other() -> None:
        with mmap.mmap(-1, 16 << 20) as m:
            mapped.append(len(m))

    before = resource.getrlimit(resource.RLIMIT_AS)
    with memory.allocation_limit(cpu, 1 << 20):
        assert resource.getrlimit(resource.RLIMIT_AS)[0] != resource.RLIM_INFINITY
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        with pytest.raises(OSError) as refused:
            mmap.mmap(-1, beyond)
    assert mapped == [16 << 20] and refused.value.errno == errno.ENOMEM
    assert resource.getrlimit(resource.RLIMIT_AS) == before
    with mmap.mmap(-1, beyond) as m:  # the limit is gone with the block
        assert len(m) == beyond


def test_one_task_that_cannot_fit_stops_the_run_with_one_line(tmp_path):
    """A worker that has 1 MiB: loop's one task measures more (or runs out of memory under the address-space
    limit), and the run stops before its first step with the estimate, what the worker has and the fixes."""
    env = {**os.environ, memory.ENV_LIMIT: "1M"}
    argv = ["train", "--config", "omniglot_5w1s", "--quiet", "--out", "run"] + [a for s in CONV4 for a in ("--set", s)]
    done = subprocess.run(
        [sys.executable, "-m", "distmaml", *argv], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 3, done.stderr
    assert "Traceback" not in done.stderr
    # the estimate: measured, or "more than 1 MiB" where the limit stopped the task part-way
    assert re.fullmatch(
        r"distmaml: error: one task of this run needs (about \d+|more than 1) MiB of memory \(batching loop, "
        r"measured\) but a worker on cpu has 1 MiB; set inner.recompute=true, algorithm=fomaml, fewer data.queries, "
        r"or run on a node with more memory",
        done.stderr.strip().splitlines()[-1],
    )
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow  # a Ray instance and a Ray Train group: about a minute
def test_a_collective_group_where_one_task_cannot_fit_stops_at_once_with_one_line(tmp_path):
    """Each worker of the group measures; the refusal is gathered and raised alike on every worker, so Ray
    Train ends the group at once (no restart into the same refusal, no worker's traceback on the console)."""
    env = {**os.environ, memory.ENV_LIMIT: "1M"}
    sets = [
        "engine.reduce=collective",
        "tracking.enabled=false",
        "engine.cpus_per_worker=0.5",
        "engine.driver_cpus=0.5",
    ]
    argv = ["train", "--workers", "2", "--quiet", "--out", "run"] + [a for s in sets for a in ("--set", s)]
    done = subprocess.run(
        [sys.executable, "-m", "distmaml", *argv], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 3, done.stderr
    assert "Traceback" not in done.stderr and "MemoryFitError" not in done.stderr, done.stderr[-3000:]
    assert re.fullmatch(
        r"distmaml: error: one task of this run needs (about \d+|more than 1) MiB of memory \(batching loop, "
        r"measured\) but a worker on cpu has 1 MiB; .*",
        done.stderr.strip().splitlines()[-1],
    )
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("cap", ["lots"])
def test_a_cap_that_is_not_bytes_is_refused(cap, monkeypatch):
    monkeypatch.setenv(memory.ENV_LIMIT, cap)
    with pytest.raises(ValueError, match="DISTMAML_WORKER_MEMORY = 'lots': expected bytes"):
        memory.env_cap()
