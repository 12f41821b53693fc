"""A sweep on a local autoscaling cluster shaped like cluster/config.yaml, as ``ray submit`` runs it.

The head offers no CPUs, so every trial runs on a GPU worker node the
autoscaler starts for it (Ray's fake multi-node provider: raylets on this
machine). Trials share checkpoints through a bucket on the local S3 server
(moto) and log to an MLflow tracking server over HTTP, bound to this machine's
non-loopback address where it has one: the path trials take on a real cluster.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import ray
from fakecluster import start_fake_cluster
from mlflow import MlflowClient
from rayhead import free_port
from s3server import s3_server
from test_tune import space_file
from test_tune_storage import _keys

from distmaml import storage
from distmaml.tune.shared import other_machines

ROOT = Path(__file__).resolve().parent.parent
SUBMIT = ROOT / "cluster" / "submit.py"


def _address() -> str:
    """This machine's first non-loopback address (``hostname -I``), else 127.0.0.1."""
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=10).stdout.split()
    except (OSError, subprocess.SubprocessError):
        out = []
    return next((a for a in out if "." in a and not a.startswith("127.")), "127.0.0.1")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """``mlflow server`` on a free port, in its own session, stopped by its process group id."""
    folder = tmp_path_factory.mktemp("mlflow")
    host, port = _address(), free_port()
    mlflow = str(Path(sys.executable).with_name("mlflow"))
    cmd = [
        mlflow, "server", "--host", host, "--port", str(port), "--workers", "1", "--serve-artifacts",
        "--allowed-hosts", f"{host}:{port},localhost:{port}",  # as cluster/config.yaml starts it
        "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination", str(folder / "artifacts"),
    ]  # fmt: skip
    log = (folder / "server.log").open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://{host}:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start:\n{(folder / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server's own session: its uvicorn workers, nothing else
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


@pytest.fixture(scope="module")
def cluster():
    """The S3 server first: the head, its autoscaler and every node it starts inherit its endpoint."""
    with s3_server(("sweeps",)):
        c = start_fake_cluster()
        try:
            yield c
        finally:
            c.stop()
            assert c.head.pids() == []


@pytest.fixture(scope="module")
def joined(cluster):
    """This test process as a client of the cluster (for its node table); yields the head's node id."""
    with cluster.joined():
        yield next(n["NodeID"] for n in ray.nodes() if "node:__internal_head__" in n["Resources"])


def _space(folder: Path) -> Path:
    """Two tiny trials at once; 2 CPUs each: one trial fills one gpu_worker node, the head (0 CPUs) holds none."""
    return space_file(
        folder,
        "cluster-sweep",
        num_samples=2,
        max_concurrent=2,
        resources={"workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 0, "driver_cpus": 1},
        space={"inner.lr": {"loguniform": [0.001, 0.1]}},
    )


@pytest.mark.slow
def test_a_sweep_runs_on_worker_nodes_with_storage_in_s3_and_runs_in_mlflow(cluster, joined, mlflow_server, tmp_path):
    workdir = tmp_path / "head-home"
    workdir.mkdir()
    script = workdir / "submit.py"
    shutil.copy(SUBMIT, script)  # ray submit copies the one script to the head and runs it there
    space = _space(tmp_path)
    args = [
        "tune", "--space", str(space), "--quiet", "--storage", "s3://sweeps/cluster",
        "--set", f"tracking.uri={mlflow_server}",
    ]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, str(script), *args], cwd=workdir, env=cluster.env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert cluster.worker_nodes() >= 1  # the autoscaler started GPU worker nodes for the trials
    best = next(line for line in proc.stdout.splitlines() if line.startswith("best checkpoint: "))
    assert best.removeprefix("best checkpoint: ").startswith("s3://sweeps/cluster/cluster-sweep-")

    # each trial ran on a worker node, never on the head, and reported it into the bucket
    uri = "s3://sweeps/cluster"
    results = [k for k in _keys(uri) if k.endswith("/result.json") and "/run_trial_" in k and "/checkpoint_" not in k]
    assert len(results) == 2
    workers = {n["NodeID"] for n in ray.nodes() if n["NodeID"] != joined}  # alive or since stopped
    for key in results:
        last = json.loads(storage.read_bytes(storage.join(uri, key)).decode().splitlines()[-1])
        assert last["step"] == 6 and last["node_id"] != joined and last["node_id"] in workers

    # both trials are child runs of the sweep's parent in the HTTP tracking server, finished
    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("cluster-sweep")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2 and len(runs) == 3
    assert parent.info.status == "FINISHED"
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.params["tracking.uri"] == mlflow_server
        assert [m.step for m in client.get_metric_history(child.info.run_id, "val_mse")] == [2, 4, 6]
        assert "config.yaml" in {a.path for a in client.list_artifacts(child.info.run_id)}  # through the server


def _submit_module():
    spec = importlib.util.spec_from_file_location("submit_script", SUBMIT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_submit_fills_in_the_heads_mlflow_server_and_a_one_machine_cluster_keeps_sqlite(
    joined, tmp_path, monkeypatch, capsys
):
    """submit.py: the head's address from Ray and a probe; the sweep's rule on a one-machine cluster."""
    submit = _submit_module()
    head = submit._head_ip()
    assert head == next(n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == joined)
    listener = socket.create_server((head, 0))  # something answers on the head: the probe is TCP
    port = listener.getsockname()[1]
    monkeypatch.setenv("DISTMAML_MLFLOW_PORT", str(port))
    space = str(_space(tmp_path))
    argv = submit._with_head_tracking(["tune", "--space", space])
    assert argv == ["tune", "--space", space, "--set", f"tracking.uri=http://{head}:{port}"]
    assert f"tracking to the head's MLflow server: --set tracking.uri=http://{head}:{port}" in capsys.readouterr().out
    named = ["train", "--set", "tracking.uri=sqlite:///x.db"]
    assert submit._with_head_tracking(named) == named  # the user's own URI stays
    off = ["train", "--set", "tracking.enabled=false"]
    assert submit._with_head_tracking(off) == off
    listener.close()
    assert submit._with_head_tracking(["train"]) == ["train"]  # nobody answers: the default stays, said once
    out = capsys.readouterr().out.strip()
    assert out.startswith(f"submit.py: no MLflow server answers at {head}:{port}") and "\n" not in out

    # all nodes of this cluster are processes on this machine: a SQLite file still works for a sweep
    assert other_machines() is None
