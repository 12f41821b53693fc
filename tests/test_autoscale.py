"""Runs on a local autoscaling cluster shaped like cluster/config.yaml (tests/fakecluster.py).

The head offers no CPUs and no worker node is up at the start: every run here
can only be held by nodes the autoscaler launches (``gpu_worker``: 2 CPUs, 1
fake GPU, at most 2). Tests run in file order: the ones that need no worker
node up come first.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
from fakecluster import start_fake_cluster

from distmaml.cluster.placement import EngineError, cluster_shape, worker_resources
from distmaml.config import load_config
from distmaml.engine.ray_engine import RayEngine
from distmaml.run.assembly import runner_factory

SUBMIT = Path(__file__).resolve().parent.parent / "cluster" / "submit.py"
TINY = ["meta.batch_size=4", "meta.val_tasks=8", "meta.test_tasks=8"]


@pytest.fixture(scope="module")
def cluster():
    c = start_fake_cluster()
    try:
        with c.joined():  # this process is a driver of the cluster too
            yield c
    finally:
        c.stop()
        assert c.head.pids() == []


def test_the_cluster_starts_with_no_worker_node_and_knows_its_node_type(cluster):
    assert cluster.worker_nodes() == 0
    assert ray.cluster_resources().get("CPU", 0) == 0 and ray.cluster_resources().get("GPU", 0) == 0
    shape = cluster_shape()
    gpu_worker = [n for n in shape.nodes if n.launchable]
    assert [(n.name, n.resources, n.count) for n in gpu_worker] == [("node type gpu_worker", {"CPU": 2, "GPU": 1}, 2)]
    assert shape.max_launches == 2


def test_gpus_default_to_one_when_the_autoscaler_can_launch_them(cluster):
    assert cluster.worker_nodes() == 0  # no GPU node up: the GPU comes from the node type
    assert worker_resources(load_config("sinusoid", TINY)).gpus == 1.0
    assert worker_resources(load_config("sinusoid", [*TINY, "device=cpu"])).gpus == 0.0


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["engine.cpus_per_worker=64"],
            "the worker bundle {'CPU': 64, 'GPU': 1} fits no node the Ray cluster has or can launch: "
            "the largest, node type gpu_worker, offers CPU 2; lower engine.cpus_per_worker to 2",
        ),
        (
            ["engine.gpus_per_worker=4"],
            "the worker bundle {'CPU': 1, 'GPU': 4} fits no node the Ray cluster has or can launch: "
            "the largest, node type gpu_worker, offers GPU 1; lower engine.gpus_per_worker to 1",
        ),
        (
            ["workers=3"],  # 3 GPUs, and the autoscaler may add 2 nodes of 1 GPU
            "the run needs 3 GPUs (3 workers x 1) but the Ray cluster has or can launch at most 2; "
            "lower workers or engine.gpus_per_worker, or add nodes",
        ),
    ],
)
def test_a_run_no_node_type_can_hold_fails_at_once(cluster, overrides, message):
    config = load_config("sinusoid", [*TINY, *overrides])
    start = time.monotonic()
    with pytest.raises(EngineError) as e:
        RayEngine(config, runner_factory(config))
    assert time.monotonic() - start < 10
    assert str(e.value) == message
    assert cluster.worker_nodes() == 0  # nothing was asked of the autoscaler


def _submit(tmp_path: Path, cluster, args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """As `ray submit` runs it: the one script copied to the head, run with the arguments after `--`."""
    home = tmp_path / "head-home"
    home.mkdir(exist_ok=True)
    script = home / "submit.py"
    shutil.copy(SUBMIT, script)
    return subprocess.run(
        [sys.executable, str(script), *args], cwd=home, env=cluster.env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
def test_submit_of_a_run_no_node_type_can_hold_fails_with_one_line(cluster, tmp_path):
    start = time.monotonic()
    proc = _submit(tmp_path, cluster, ["train", "--quiet", "--set", "engine.cpus_per_worker=64"], timeout=300)
    seconds = time.monotonic() - start
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "distmaml: error: the worker bundle {'CPU': 64, 'GPU': 1} fits no node the Ray cluster has or can launch: "
        "the largest, node type gpu_worker, offers CPU 2; lower engine.cpus_per_worker to 2"
    )
    assert "Traceback" not in proc.stderr
    print(f"\nsubmit of an impossible run: exit 3 after {seconds:.1f} s, Python start-up and imports included")
    assert seconds < 60  # the engine's part is bounded at 10 s above; the rest is start-up on a shared machine


@pytest.mark.slow
def test_submit_train_waits_for_the_autoscaler_and_finishes(cluster, tmp_path):
    assert cluster.worker_nodes() == 0
    run = tmp_path / "run"
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [
        "train", "--quiet", "--workers", "2", "--out", str(run), "--set", "meta.steps=4",
        *[a for o in TINY for a in ("--set", o)],
        "--set", f"tracking.uri={tracking_uri}", "--set", "tracking.experiment=autoscale",
    ]  # fmt: skip
    submitted = time.time()
    proc = _submit(tmp_path, cluster, args, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the head alone offers nothing: the run waited for nodes the autoscaler added
    assert f"joined the Ray cluster at {cluster.address}" in proc.stdout
    waits = [line for line in proc.stderr.splitlines() if line.startswith("distmaml: waiting")]
    assert waits, proc.stderr[-3000:]
    assert re.fullmatch(
        r"distmaml: waiting \d+ s for the run's placement group \{'CPU': 1\} \+ 2 x \{'CPU': 1, 'GPU': 1\} \(PACK\): "
        r"the autoscaler can add 2 nodes of type gpu_worker \{'CPU': 2, 'GPU': 1\}; "
        r"(nothing launching|\d+ launch(es)? in flight|\d+ nodes? starting(, \d+ launch(es)? in flight)?) "
        r"\(engine.startup_timeout = 1800 s\)",
        waits[0],
    ), waits[0]
    assert cluster.worker_nodes() == 2
    result = json.loads((run / "result.json").read_text())
    assert result["steps"] == 4 and result["workers"] == 2 and result["meta_test"]["tasks"] == 8

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    (mlrun,) = client.search_runs([client.get_experiment_by_name("autoscale").experiment_id])
    assert mlrun.info.status == "FINISHED"
    history = client.get_metric_history(mlrun.info.run_id, "train_loss")
    assert [m.step for m in history] == [1, 2, 3, 4]
    first_step = history[0].timestamp / 1000 - submitted
    print(
        f"\nsubmit to the first meta-step on the fake autoscaling cluster: {first_step:.1f} s "
        f"(the whole run {time.time() - submitted:.1f} s); it printed:",
        *waits,
        sep="\n",
    )


@pytest.mark.slow
def test_a_run_the_autoscaler_cannot_launch_nodes_for_stops_after_engine_startup_stall(tmp_path):
    """Every launch of the node type fails (the fake provider cannot start a node whose object store is
    1000 bytes; Ray's minimum is 75 MiB): no node ever starts, and the run says so in one line instead of
    waiting out engine.startup_timeout (1800 s)."""
    broken = {"resources": {"CPU": 2, "GPU": 1, "object_store_memory": 1000}, "min_workers": 0, "max_workers": 2}
    cluster = start_fake_cluster({"gpu_worker": broken})
    try:
        start = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "distmaml", "train", "--quiet", "--workers", "1", "--address", cluster.address,
             "--set", "engine.startup_stall=20", "--set", "tracking.enabled=false", *[a for o in TINY for a in ("--set", o)]],
            cwd=tmp_path, env=cluster.env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        seconds = time.monotonic() - start
        assert cluster.worker_nodes() == 0
    finally:
        cluster.stop()
    assert proc.returncode == 3, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        r"distmaml: error: the run's placement group \{'CPU': 1\} \+ \{'CPU': 1, 'GPU': 1\} \(PACK\) waited \d+ s "
        r"with no node starting, though the autoscaler can add 1 node of type gpu_worker \{'CPU': 2, 'GPU': 1\}: "
        r".+; see 'ray status' and the autoscaler's log on the head \(.+\), or raise engine.startup_stall",
        last,
    ), last
    assert "Traceback" not in proc.stderr
    print(f"\na run the autoscaler cannot launch for: exit 3 after {seconds:.0f} s (engine.startup_stall = 20 s)")
