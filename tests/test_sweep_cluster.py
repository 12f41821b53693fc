"""A sweep on a local autoscaling cluster shaped like cluster/config.yaml, as ``ray submit`` runs it.

The head offers no CPUs, so every trial runs on a GPU worker node the
autoscaler starts for it (Ray's fake multi-node provider: raylets on this
machine). Trials share checkpoints through a bucket on the local S3 server
(moto) and log to an MLflow tracking server over HTTP on the head's address: the path trials take on a
real cluster. Everything is on loopback (tests/rayhead.py's LOOPBACK_ONLY: every node's address is
127.0.0.1).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import ray
from fakecluster import start_fake_cluster
from mlflow import MlflowClient
from mlflowserver import mlflow_server as mlflow_server_on
from s3server import s3_server
from test_tune import space_file
from test_tune_storage import _keys

from distmaml import oncluster, storage
from distmaml.config import load_config
from distmaml.tune.shared import other_machines

ROOT = Path(__file__).resolve().parent.parent
SUBMIT = ROOT / "cluster" / "submit.py"


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """``mlflow server`` on the head's address (here 127.0.0.1: every node of this cluster is on loopback)."""
    with mlflow_server_on(tmp_path_factory.mktemp("mlflow"), "127.0.0.1") as uri:
        yield uri


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


@pytest.mark.slow
def test_the_heads_mlflow_server_is_filled_in_and_a_one_machine_cluster_keeps_sqlite(
    joined, tmp_path, monkeypatch, capsys
):
    """distmaml.oncluster (both doors): the head's address from Ray and a probe; the sweep's rule on one machine."""
    head = oncluster.head_ip()
    assert head == next(n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == joined) == "127.0.0.1"
    listener = socket.create_server((head, 0))  # something answers on the head: the probe is TCP
    port = listener.getsockname()[1]
    monkeypatch.setenv("DISTMAML_MLFLOW_PORT", str(port))
    assert oncluster.head_tracking_uri() == f"http://{head}:{port}"
    assert f"tracking to the head's MLflow server: --set tracking.uri=http://{head}:{port}" in capsys.readouterr().out
    config = load_config("sinusoid", [])
    assert oncluster.tracks_to_default(config, [])
    assert not oncluster.tracks_to_default(config, ["tracking.uri=sqlite:///mlflow.db"])  # named: the user's own
    assert not oncluster.tracks_to_default(load_config("sinusoid", ["tracking.enabled=false"]), [])
    listener.close()
    assert oncluster.head_tracking_uri() is None  # nobody answers: the default stays, said once
    out = capsys.readouterr().out.strip()
    assert out.startswith(f"distmaml: no MLflow server answers at {head}:{port}") and "\n" not in out

    # all nodes of this cluster are processes on this machine: a SQLite file still works for a sweep
    assert other_machines() is None
