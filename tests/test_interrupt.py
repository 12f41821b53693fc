"""SIGTERM and SIGINT mid-run: a clean stop, one line, no Ray process left; ``--resume`` equals a run never stopped.

Each interrupted run is a real ``python -m distmaml train`` process, started
with the default handlers of SIGINT and SIGTERM (a background job of a
non-interactive shell would ignore SIGINT), tracking on (SQLite in the test's
folder), float64, and ``meta.checkpoint_every`` larger than the run, so the
only checkpoint near the signal is the one the stop writes. The signal is sent
once the progress bar shows a few steps or, in the runs of Ray workers, while a
worker is paused at step 5 (``tests/pausing.py``): those runs stop on time
whatever the machine's speed, so they are short. The Ray processes a run starts
carry a marker in their environment (they inherit it from the driver), so the
test finds them among new pids whatever other Ray instances run on the machine.

The resume and the uninterrupted run go through the CLI in this process.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from pausing import act_at_pause, plan, points_env

import distmaml
from distmaml.cli import main
from distmaml.machine import interrupt

ROOT = Path(__file__).resolve().parent.parent
MARK = "DISTMAML_TEST_RUN"
CRASH_TEXT = ("Traceback", "SIGTERM received", "PC: @", "core dumped", "Aborted", "logging.cc")
STEPS = 400  # enough that the signal lands mid-run on an idle machine too (a signal sent on the progress bar)
PAUSED_STEPS = 30
"""Runs of Ray workers: the signal goes while a worker is paused at step 5 (``points``), whatever the speed."""


def sets(*extra: str, steps: int = STEPS) -> list[str]:
    options = [
        f"meta.steps={steps}", "meta.batch_size=4", "meta.val_every=0", "meta.checkpoint_every=100000",
        "meta.test_tasks=8", "meta.val_tasks=8", "precision=float64", *extra,
    ]  # fmt: skip
    return [x for o in options for x in ("--set", o)]


def _default_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, state, start time) of a process, None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return int(fields[1]), fields[0], int(fields[19])


def run_processes(root: int | None, marker: str, before: set[int]) -> set[tuple[int, int]]:
    """(pid, start time) of the live processes a run started: descendants of its driver ``root``, and
    new processes whose environment holds ``MARK=marker``. The environment alone misses Ray's agents:
    renaming themselves ``ray::...`` overwrites it."""
    stats = {int(p.name): _stat(int(p.name)) for p in Path("/proc").iterdir() if p.name.isdigit()}
    live = {pid: st for pid, st in stats.items() if st is not None and st[1] != "Z"}
    found: set[int] = set()
    frontier = [root] if root is not None else []
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, st in live.items() if st[0] == parent]
        found.update(children)
        frontier.extend(children)
    needle = f"{MARK}={marker}".encode()
    for pid in set(live) - before:
        try:
            if needle in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                found.add(pid)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return {(pid, live[pid][2]) for pid in found if pid in live}


def still_alive(processes: set[tuple[int, int]]) -> list[str]:
    """Command lines of those processes still running (same pid and start time, not a zombie)."""
    alive = []
    for pid, started in processes:
        st = _stat(pid)
        if st is not None and st[1] != "Z" and st[2] == started:
            try:
                alive.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200])
            except FileNotFoundError:
                continue
    return alive


@dataclass
class Stopped:
    code: int
    stderr: str
    seconds: float
    """From the signal to the process's exit."""
    step_seen: int
    left: list[str]
    """Command lines of the run's processes still alive 10 s after it exited."""
    since_signal: str = ""
    """``stderr`` from the signal on (Ray Train's controller logs its own retries on a loaded machine
    before it, with their tracebacks)."""

    @property
    def line(self) -> str:
        return [x for x in re.split(r"[\r\n]", self.stderr) if x.strip()][-1]


def stop_mid_run(
    args: list[str],
    cwd: Path,
    sig: int,
    after_step: int = 3,
    settle: float = 0.0,
    timeout: float = 300.0,
    env: dict[str, str] | None = None,
    points: Path | None = None,
    stop_seen: bool = False,
) -> Stopped:
    """Runs ``distmaml train ARGS``; sends ``sig`` ``settle`` s after its progress bar shows ``after_step`` steps.

    With ``points`` (a test points folder, ``tests/pausing.py``), the signal goes when a worker pauses at
    ``step:AFTER_STEP`` instead, and the worker goes on after it: the progress bar of a collective
    group's rank 0 reaches the driver's console only line by line, long after the steps. With ``stop_seen``
    (a collective group, whose rank 0 learns of the stop from the driver a moment later), the worker goes
    on once rank 0 has the stop request: a short run cannot end before it does.
    """
    marker = uuid.uuid4().hex
    before = {int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()}
    env = {**(env or os.environ), "PYTHONPATH": str(ROOT), MARK: marker}
    if points is not None:
        plan(points, f"step:{after_step}")
        if stop_seen:
            plan(points, "stop_seen")
        env.update(points_env(points))
    cmd = [sys.executable, "-m", "distmaml", "train", *args]
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=_default_signals
    )
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: proc.stderr.read1(4096), b"")))  # type: ignore[union-attr]
    reader.start()
    deadline = time.monotonic() + timeout
    seen = -1
    paused: list[Path] = []
    try:
        while seen < after_step:
            assert proc.poll() is None, f"the run ended before step {after_step}:\n{b''.join(chunks).decode()[-3000:]}"
            assert time.monotonic() < deadline, f"no progress past step {seen} after {timeout} s"
            time.sleep(0.05)
            if points is not None:
                paused = list(points.glob("ready-*"))
                seen = after_step if paused else -1
                continue
            steps = re.findall(rb"(\d+)/" + str(STEPS).encode() + rb" \[", b"".join(chunks))
            seen = max([int(s) for s in steps], default=-1)
        time.sleep(settle)
        started = run_processes(proc.pid, marker, before)
        os.kill(proc.pid, sig)
        sent = time.monotonic()
        at_signal = len(b"".join(chunks))
        if points is not None and stop_seen:  # rank 0 pauses at stop_seen once it holds the request
            held = act_at_pause(points, lambda pid: None, {p.name for p in paused}, alive=lambda: proc.poll() is None)
            assert held, "the group never saw the stop request"
        for ready in paused:  # the paused worker computes its step: the group stops after a step, whole
            (ready.parent / f"go-{ready.read_text()}").write_text("")
        proc.wait(timeout=120)
        seconds = time.monotonic() - sent
    finally:
        proc.kill()
        proc.wait()
        reader.join()
    started |= run_processes(None, marker, before)  # orphans started after the snapshot
    grace = time.monotonic() + 10
    while (left := still_alive(started)) and time.monotonic() < grace:
        time.sleep(0.2)
    out = b"".join(chunks)
    return Stopped(
        proc.returncode, out.decode(errors="replace"), seconds, seen, left, out[at_signal:].decode(errors="replace")
    )


def check_clean_stop(stopped: Stopped, sig: int, run_dir: str, steps: int = STEPS) -> int:
    """The exit code, the one line, no traceback or crash dump, nothing left running; returns the step saved."""
    name = signal.Signals(sig).name
    assert stopped.code == 128 + sig, stopped.stderr[-3000:]
    assert stopped.seconds < 30
    for text in CRASH_TEXT:
        assert text not in stopped.since_signal, stopped.stderr[-3000:]
    found = re.fullmatch(
        rf"distmaml: stopped by {name} after meta-step (\d+); saved (\S+); "
        rf"continue with: distmaml train --resume {re.escape(run_dir)}",
        stopped.line,
    )
    assert found, stopped.line
    step = int(found.group(1))
    assert stopped.step_seen <= step < steps
    assert found.group(2) == f"{run_dir}/checkpoints/step_{step:09d}.pt"
    assert stopped.left == []
    return step


def mlflow_status(uri: str, run_id: str) -> str:
    from mlflow import MlflowClient

    return str(MlflowClient(tracking_uri=uri).get_run(run_id).info.status)


_WHOLE: dict[tuple[str, ...], Any] = {}
"""The run never stopped, per command line: computed by the first test that needs it, shared with the next."""


def resume_equals_uninterrupted(
    tmp_path: Path, run: str, args: list[str], uri: str, saved: int, steps: int = STEPS, in_process: bool = False
) -> None:
    """``--resume`` ends the same MLflow run, FINISHED, with the parameters of a run never stopped (1e-12).
    ``in_process``: the run never stopped is the in-process engine's (a collective group of any size ends
    with its parameters to 1e-10, tests/test_collective.py), sparing another group's start."""
    run_id = (Path(run) / "mlflow_run_id").read_text().strip()
    assert mlflow_status(uri, run_id) == "KILLED"
    assert distmaml.load_checkpoint(run).step == saved
    assert main(["train", "--quiet", "--resume", run]) == 0
    assert (Path(run) / "mlflow_run_id").read_text().strip() == run_id
    assert mlflow_status(uri, run_id) == "FINISHED"
    key = (*(a for a in args if not a.startswith("tracking.uri=")), str(in_process))  # SIGTERM's = SIGINT's
    if key not in _WHOLE:
        whole = str(tmp_path / "whole")
        engine = ["--workers", "0", "--set", "engine.reduce=driver"] if in_process else []
        assert main(["train", "--quiet", "--out", whole, *args, "--set", "tracking.enabled=false", *engine]) == 0
        _WHOLE[key] = distmaml.load_checkpoint(whole)
    a, b = distmaml.load_checkpoint(run), _WHOLE[key]
    assert a.step == b.step == steps and sorted(a.params) == sorted(b.params)
    for k, v in b.params.items():
        assert v.dtype == torch.float64
        torch.testing.assert_close(a.params[k], v, rtol=0, atol=1e-10 if in_process else 1e-12)


def test_a_signal_inside_atomic_is_raised_when_the_block_ends_and_a_second_is_ignored():
    previous = signal.getsignal(signal.SIGTERM)
    done = []
    with pytest.raises(interrupt.Interrupted) as info:
        with interrupt.stop_on_signals():
            with interrupt.atomic():
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.2)  # both handlers have run by now
                done.append("the whole block")
            done.append("past the block")
    assert done == ["the whole block"]
    assert (info.value.name, info.value.exit_code) == ("SIGTERM", 143)
    assert signal.getsignal(signal.SIGTERM) is previous  # handlers restored


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_in_process_engine_stops_cleanly_and_resumes_exactly(sig, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = ["--workers", "0", *sets(f"tracking.uri={uri}")]
    run = "run"
    stopped = stop_mid_run(["--out", run, *args], tmp_path, sig)
    saved = check_clean_stop(stopped, sig, run)
    resume_equals_uninterrupted(tmp_path, run, args, uri, saved)


def test_without_out_the_line_says_nothing_was_saved(tmp_path):
    stopped = stop_mid_run(["--workers", "0", *sets("tracking.enabled=false")], tmp_path, signal.SIGINT)
    assert stopped.code == 130 and stopped.seconds < 30 and stopped.left == []
    assert "Traceback" not in stopped.stderr
    assert re.fullmatch(
        r"distmaml: stopped by SIGINT after meta-step \d+; nothing saved: without --out the run has no "
        r"checkpoints \(pass --out RUN_DIR to resume later\)",
        stopped.line,
    ), stopped.line


@pytest.mark.slow
def test_ray_engine_stops_cleanly_and_resumes_exactly(tmp_path, monkeypatch):
    """``--workers 2`` on the default ``--address local``: the run's own Ray instance ends with it."""
    import ray

    monkeypatch.chdir(tmp_path)
    points = tmp_path / "points"
    points.mkdir()
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = ["--workers", "2", *sets(f"tracking.uri={uri}", steps=PAUSED_STEPS)]
    run = "run"
    stopped = stop_mid_run(["--out", run, *args], tmp_path, signal.SIGTERM, after_step=5, points=points)
    saved = check_clean_stop(stopped, signal.SIGTERM, run, PAUSED_STEPS)
    # the resume and the reference share one Ray instance; 2 workers in both (sums in the same order)
    ray.init(address="local", num_cpus=3, include_dashboard=False)
    try:
        resume_equals_uninterrupted(tmp_path, run, args, uri, saved, PAUSED_STEPS)
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_a_meta_step_longer_than_30s_does_not_delay_the_stop(tmp_path):
    """The signal lands in a meta-step sized to take over a minute on each Ray worker: the run stops within 30 s
    with the state before that step (step 0) saved."""
    from distmaml.config import load_config
    from distmaml.engine.protocol import ParamLayout
    from distmaml.run.assembly import assemble

    run = assemble(
        load_config("sinusoid", ["batching=loop", "precision=float64", "tracking.enabled=false", "workers=0"])
    )
    flat = ParamLayout(run.params).flatten(run.params)
    began = time.perf_counter()
    run.engine.meta_batch(flat, 0, 100)
    run.close()
    per_task = (time.perf_counter() - began) / 100
    batch = 2 * max(1000, int(60 / per_task))  # each of 2 workers: over 60 s of tasks, as timed in this process
    args = [
        "--out",
        "run",
        "--workers",
        "2",
        *sets("batching=loop", "tracking.enabled=false", f"meta.batch_size={batch}"),
    ]
    stopped = stop_mid_run(args, tmp_path, signal.SIGTERM, after_step=0, settle=3.0)
    assert stopped.step_seen == 0
    assert check_clean_stop(stopped, signal.SIGTERM, "run") == 0


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_collective_engine_stops_cleanly_and_resumes_exactly(sig, tmp_path, monkeypatch):
    """``engine.reduce=collective``: the driver asks its Ray Train group to stop after the step in flight;
    rank 0 checkpoints it, no worker process outlives the run, and the resume ends where a run never
    stopped ends (Ray Train's SIGINT handler, which would abort the group unsaved, is not used)."""
    import ray

    monkeypatch.chdir(tmp_path)
    points = tmp_path / "points"
    points.mkdir()
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = [
        "--workers",
        "2",
        *sets(f"tracking.uri={uri}", "engine.reduce=collective", "batching=batched", steps=PAUSED_STEPS),
    ]
    run = "run"
    stopped = stop_mid_run(["--out", run, *args], tmp_path, sig, after_step=5, points=points, stop_seen=True)
    saved = check_clean_stop(stopped, sig, run, PAUSED_STEPS)
    assert (tmp_path / run / "checkpoints" / f"step_{saved:09d}.pt").is_file()
    ray.init(address="local", num_cpus=3, include_dashboard=False)  # for the resume
    try:
        resume_equals_uninterrupted(tmp_path, run, args, uri, saved, PAUSED_STEPS, in_process=True)
    finally:
        ray.shutdown()


CLUSTER_STATE = """
import json, time, ray
ray.init()  # RAY_ADDRESS and the token come from the head's environment
deadline = time.monotonic() + 30
while ray.available_resources().get("CPU", 0) < 3 and time.monotonic() < deadline:
    time.sleep(0.5)
groups = ray.util.placement_group_table().values()
print(json.dumps([ray.available_resources().get("CPU", 0), [g["state"] for g in groups if g["name"].startswith("distmaml-run-")]]))
"""


@pytest.mark.slow
def test_on_a_joined_cluster_the_actors_and_the_placement_group_go(tmp_path):
    """``--address`` of a running cluster (what ``ray submit`` and ``ray job`` drivers use): the cluster stays up,
    and the run's worker actors and placement group are gone once it exits (all its CPUs free again)."""
    from rayhead import start_head

    head = start_head(num_cpus=3)  # the driver's bundle and 2 workers
    try:
        args = ["--out", "run", "--workers", "2", "--address", head.address, *sets("tracking.enabled=false")]
        stopped = stop_mid_run(args, tmp_path, signal.SIGTERM, env=head.env)
        check_clean_stop(stopped, signal.SIGTERM, "run")
        # asked from a fresh process: Ray keeps the auth settings of its first connection in this one
        found = subprocess.run(
            [sys.executable, "-c", CLUSTER_STATE], env=head.env, capture_output=True, text=True, timeout=120
        )
        assert found.returncode == 0, found.stderr[-2000:]
        cpus, states = json.loads(found.stdout.strip().splitlines()[-1])
        assert cpus == 3
        assert states and set(states) == {"REMOVED"}
    finally:
        head.stop()
