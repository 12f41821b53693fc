"""A tracking server that stops answering mid-run: the run goes on, and MLflow gets its whole history once.

Against real ``mlflow server`` processes on loopback (a SQLite store in the
test's folder, artifacts served by the server) and real ``distmaml train``
processes. The run's task family is the sinusoid behind a gate (``gate.py``
below): sampling the tasks of a gated step writes ``at<step>`` and waits for
``go<step>``, so the test kills and restarts the server at known steps, by
handshakes, never by sleeping.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from mlflowserver import start_server, wait_healthy
from rayhead import free_port, new_temp_dir

STEPS, VAL_EVERY = 20, 10
PER_STEP = ("train_loss", "train_mse", "tasks_per_second", "meta_lr", "worker_replacements")

GATE = '''
import os, time
from pathlib import Path

from distmaml.tasks.sinusoid import SinusoidTasks


class Gated:
    """The sinusoid tasks; sampling meta-train step s (s in GATE_STEPS) waits for GATES/go<s>."""

    loss = "mse"

    def __init__(self, config):
        self.tasks = SinusoidTasks(config.data.shots, config.data.queries, config.seed)
        self.gates = Path(os.environ["GATES"])
        self.steps = {int(s) for s in os.environ["GATE_STEPS"].split(",") if s}

    def sample(self, split, step, ids):
        if split == "train" and step in self.steps:
            (self.gates / f"at{step}").touch()
            while not (self.gates / f"go{step}").exists():
                time.sleep(0.02)
        return self.tasks.sample(split, step, ids)
'''


class Server:
    """``mlflow server`` on 127.0.0.1:``port`` over ``folder``'s SQLite store, killed and started again at will."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = start_server(self.folder, self.port)
        wait_healthy(self.uri, self.proc)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


class Training:
    """A ``distmaml train`` process whose stderr lines are collected as they come."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str]) -> None:
        self.lines: list[tuple[float, str]] = []
        self._seen = threading.Condition()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "distmaml", *args], cwd=cwd, env=env, stderr=subprocess.PIPE, text=True
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._seen:
                self.lines.append((time.monotonic(), line.rstrip("\n")))
                self._seen.notify_all()

    def wait_line(self, text: str) -> float:
        """Waits for a stderr line containing ``text``; when it came (time.monotonic)."""
        with self._seen:
            while True:
                for at, line in self.lines:
                    if text in line:
                        return at
                assert self.proc.poll() is None or self._reader.is_alive(), f"no line with {text!r}: {self.lines}"
                self._seen.wait(timeout=1.0)

    def finish(self) -> int:
        code = self.proc.wait()
        self._reader.join()
        return code

    def said(self, text: str) -> list[str]:
        return [line for _, line in self.lines if text in line]


def wait_file(path: Path, run: Training, within: float = 300.0) -> None:
    """Waits for the gate file ``path``; fails if the run ends first or nothing comes within ``within`` s."""
    deadline = time.monotonic() + within
    while not path.exists():
        if run.proc.poll() is not None:
            run.finish()
            raise AssertionError(f"the run ended before {path.name}: {[line for _, line in run.lines][-20:]}")
        if time.monotonic() > deadline:
            run.proc.kill()
            run.finish()
            raise AssertionError(f"no {path.name} within {within:.0f} s: {[line for _, line in run.lines][-20:]}")
        time.sleep(0.02)


@pytest.fixture
def setup(tmp_path):
    (tmp_path / "gate.py").write_text(textwrap.dedent(GATE))
    (tmp_path / "gates").mkdir()
    server = Server(tmp_path / "store")
    server.folder.mkdir()
    server.start()
    yield tmp_path, server
    server.kill()


def _train(tmp_path: Path, server: Server, gate_steps: str, *extra: str, workers: int = 0) -> Training:
    env = dict(os.environ, GATES=str(tmp_path / "gates"), GATE_STEPS=gate_steps, PYTHONPATH=str(tmp_path))
    sets = [
        f"meta.steps={STEPS}", f"meta.val_every={VAL_EVERY}", "meta.checkpoint_every=10", "meta.batch_size=4",
        "meta.val_tasks=8", "meta.test_tasks=8", "tracking.log_every=1", f"tracking.uri={server.uri}",
        "data.family=gate:Gated",
    ]  # fmt: skip
    args = ["train", "--quiet", "--workers", str(workers), "--out", "run"]
    for s in [*sets, *extra]:
        args += ["--set", s]
    return Training(args, tmp_path, env)


def _go(tmp_path: Path, step: int) -> None:
    (tmp_path / "gates" / f"go{step}").touch()


def _check_complete(uri: str, run_id: str) -> None:
    """MLflow holds the run FINISHED with every step's metrics once, the artifacts and the model."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for key in PER_STEP:
        steps = sorted(m.step for m in client.get_metric_history(run_id, key))
        assert steps == list(range(1, STEPS + 1)), key  # as many points as a run whose server never left
    assert sorted(m.step for m in client.get_metric_history(run_id, "val_mse")) == [10, 20]
    assert {"test_mse", "test_mse_ci95", "test_mse_unadapted"} <= set(run.data.metrics)
    assert run.data.params["meta.steps"] == str(STEPS)
    assert {a.path for a in client.list_artifacts(run_id)} >= {"config.yaml", "result.json", "checkpoint", "plots"}
    assert [a.path for a in client.list_artifacts(run_id, "checkpoint")] == [f"checkpoint/step_{STEPS:09d}.pt"]
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert [m.source_run_id for m in models] == [run_id]


def _histories(uri: str, run_id: str) -> dict[str, list[tuple[int, float, int]]]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    keys = [*PER_STEP, "val_mse", "test_mse"]
    return {k: sorted((m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, k)) for k in keys}


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2], ids=["in-process", "ray-workers"])
def test_a_server_killed_mid_run_and_restarted_gets_the_whole_run(setup, workers):
    tmp_path, server = setup
    run = _train(tmp_path, server, "5,10", workers=workers)
    try:
        wait_file(tmp_path / "gates" / "at5", run)
        server.kill()
        released = time.monotonic()
        _go(tmp_path, 5)  # steps 5..9 are logged to a dead server
        noticed = run.wait_line("does not answer")
        wait_file(tmp_path / "gates" / "at10", run)
        server.start()
        restarted = time.monotonic()
        _go(tmp_path, 10)
        assert run.finish() == 0
    finally:
        run.proc.kill()
    back = run.wait_line("is back after")
    print(f"\nnoticed the dead server {noticed - released:.1f} s after its first record; "
          f"caught up {back - restarted:.1f} s after the restart: {run.said('is back after')[0]}")  # fmt: skip
    assert len(run.said("does not answer")) == 1 and len(run.said("is back after")) == 1
    assert not run.said("distmaml sync")
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["tracking_pending"] == 0 and result["steps"] == STEPS
    _check_complete(server.uri, result["mlflow_run_id"])


@pytest.mark.slow
def test_a_server_down_at_the_end_gets_the_rest_from_sync_once(setup):
    from distmaml.cli import main

    tmp_path, server = setup
    run = _train(tmp_path, server, "5")
    try:
        wait_file(tmp_path / "gates" / "at5", run)
        server.kill()
        _go(tmp_path, 5)
        assert run.finish() == 0
    finally:
        run.proc.kill()
    assert len(run.said("does not answer")) == 1
    [last] = run.said("did not answer by the end of the run")
    assert last.endswith("send them with 'distmaml sync run'")
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["tracking_pending"] > 0 and result["steps"] == STEPS
    run_id = result["mlflow_run_id"]  # created while the server was up

    os.chdir(tmp_path)  # where the line said to run it
    assert main(["sync", "run"]) == 3  # still down: one line, nothing lost
    server.start()
    from mlflow import MlflowClient

    assert MlflowClient(tracking_uri=server.uri).get_run(run_id).info.status == "RUNNING"
    sync = subprocess.run(
        [sys.executable, "-m", "distmaml", "sync", "run"], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert (
        sync.stdout
        == f"run: sent {result['tracking_pending']} records to MLflow run {run_id} in {server.uri} (FINISHED)\n"
    )
    _check_complete(server.uri, run_id)
    before = _histories(server.uri, run_id)
    again = subprocess.run(
        [sys.executable, "-m", "distmaml", "sync", "run"], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert again.stdout.startswith("run: nothing to send; all ") and again.stdout.endswith(" (FINISHED)\n")
    assert _histories(server.uri, run_id) == before
    _check_complete(server.uri, run_id)


@pytest.mark.slow
def test_a_tune_trial_keeps_its_outbox_in_its_checkpoint_for_sync(setup):
    """A one-trial sweep whose server dies mid-trial: the sweep ends, the trial's checkpoint holds the rest."""
    tmp_path, server = setup
    space = {
        "name": "outage", "base": "sinusoid", "metric": "val_mse", "mode": "min", "search": "random",
        "scheduler": "fifo", "num_samples": 1, "max_concurrent": 1, "max_failures": 0,
        "set": {"meta.steps": STEPS, "meta.val_every": VAL_EVERY, "meta.checkpoint_every": 10,
                "meta.batch_size": 4, "meta.val_tasks": 8, "meta.test_tasks": 8, "tracking.log_every": 1,
                "tracking.uri": server.uri, "data.family": "gate:Gated"},
        "resources": {"workers": 0, "driver_cpus": 0.5},
        "space": {"inner.lr": {"choice": [0.01]}},
    }  # fmt: skip
    (tmp_path / "outage.yaml").write_text(json.dumps(space))  # JSON is YAML
    env = dict(os.environ, GATES=str(tmp_path / "gates"), GATE_STEPS="5", PYTHONPATH=str(tmp_path))
    # This machine's record of the cluster 'ray start' last began, a cluster now gone. With no --address and no
    # RAY_ADDRESS the sweep starts a Ray of its own: it once joined the recorded cluster, whose workers lack
    # this environment (GATES), and which here is not there at all.
    ray_tmp = new_temp_dir()  # the sweep's own Ray keeps its sockets here too
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")
    env.pop("RAY_ADDRESS", None)
    env["RAY_TMPDIR"] = str(ray_tmp)
    sweep = Training(
        ["tune", "--space", "outage.yaml", "--quiet", "--storage", str(tmp_path / "results")], tmp_path, env
    )
    try:
        wait_file(tmp_path / "gates" / "at5", sweep)
        server.kill()
        _go(tmp_path, 5)
        assert sweep.finish() == 0
    finally:
        sweep.proc.kill()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    [line] = sweep.said("MLflow did not take its last records")
    checkpoint = line.split("'distmaml sync ")[1].rstrip("'")
    assert Path(checkpoint, "tracking", "outbox.jsonl").is_file()
    server.start()
    sync = subprocess.run(
        [sys.executable, "-m", "distmaml", "sync", checkpoint], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert " records to MLflow run " in sync.stdout and sync.stdout.endswith(" (FINISHED)\n")
    run_id = Path(checkpoint, "mlflow_run_id").read_text().strip()
    _check_complete(server.uri, run_id)
