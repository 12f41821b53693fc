"""Elastic worker counts and worker failures of the collective engine, on a local cluster of 3 worker nodes.

A group that loses a worker (its process killed by pid, or its node removed)
restarts from its latest checkpoint, smaller if it must, and ends with the
parameters and optimizer state of the undisturbed fixed-size run (computed in-process; float64,
1e-10). A group of 2 that a third node joins mid-run restarts with 3 and ends
there too. One failure more than ``engine.max_worker_failures`` stops the run
with one line.

The disturbance is synchronised, not timed: at a given step of its first
attempt rank 0 writes its pid and waits (``PauseAt``) while the test kills a
worker, removes a node or adds one.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import ray
import torch
from pausing import act_at_pause, disturb
from ray import cloudpickle
from ray._private import state  # the GCS actor table: pids and nodes without the dashboard's state API
from ray.cluster_utils import Cluster

from distmaml.config import load_config
from distmaml.engine.elastic import POLL_ENV, POLL_SECONDS, REGROUP_TIMEOUT_ENV, GroupFailure, group_settings
from distmaml.run.assembly import assemble
from distmaml.run.checkpoint import load_checkpoint
from distmaml.run.trainer import Callback

pytestmark = pytest.mark.slow  # each run starts a Ray Train group; a restart waits for Ray to notice

BASE = [
    "engine.reduce=collective",
    "precision=float64",
    "algorithm=mamlpp",  # a step-dependent inner loop and a cosine schedule: both must resume exactly
    "mamlpp.msl_anneal_steps=4",
    "mamlpp.first_order_steps=3",
    "batching=loop",
    "meta.batch_size=6",
    "meta.steps=8",
    "meta.checkpoint_every=2",
    "meta.val_every=4",
    "meta.val_tasks=4",
    "meta.test_tasks=6",
    "model.hidden=[8,8]",
    "tracking.enabled=false",
    "engine.cpus_per_worker=2",  # only a worker node has room for a worker, never the head
    "engine.driver_cpus=1",
]
PAUSE_STEP = 5
"""The step rank 0 pauses at: after the checkpoint of step 4, so a restart recomputes at least one step."""


class PauseAt(Callback):
    """On rank 0: records each start's pid; at ``step`` of the first attempt, writes ``ready`` and waits for ``go``."""

    def __init__(self, folder: Path, step: int, times: int = 1) -> None:
        self.folder, self.step, self.times = folder, step, times

    def on_start(self, trainer: Any) -> None:
        with open(self.folder / "starts", "a") as f:
            f.write(f"{os.getpid()} {trainer.step} {time.time()}\n")

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        done = len(list(self.folder.glob("ready-*")))
        if step != self.step or done >= self.times or (self.folder / f"ready-{os.getpid()}").exists():
            return
        (self.folder / f"ready-{os.getpid()}").write_text(str(os.getpid()))
        deadline = time.monotonic() + 300
        while not (self.folder / f"go-{os.getpid()}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)


cloudpickle.register_pickle_by_value(sys.modules[__name__])  # PauseAt travels to the workers, which lack tests/


def group_workers() -> list[dict[str, Any]]:
    """The live Ray Train workers of this cluster: pid and node id."""
    return [
        {"pid": a["Pid"], "node": a["Address"]["NodeID"]}
        for a in state.actors().values()
        if a["ActorClassName"] == "RayTrainWorker" and a["State"] == "ALIVE"
    ]


def kill_a_peer(rank0_pid: int) -> None:
    """SIGKILL to a worker of the group other than rank 0."""
    peers = [w["pid"] for w in group_workers() if w["pid"] != rank0_pid]
    assert peers, "no worker besides rank 0"
    os.kill(max(peers), 9)


def test_ray_train_polls_the_group_often_and_waits_regroup_timeout_unless_the_user_exported_either(monkeypatch):
    """Ray Train reads both from the driver's environment when fit() starts (and passes them to its controller)."""
    config = load_config("sinusoid", ["engine.reduce=collective", "workers=2", "engine.regroup_timeout=7"])
    monkeypatch.delenv(POLL_ENV, raising=False)  # tests/conftest.py exports 0.2 for the whole suite
    monkeypatch.delenv(REGROUP_TIMEOUT_ENV, raising=False)
    with group_settings(config):
        assert (os.environ[POLL_ENV], os.environ[REGROUP_TIMEOUT_ENV]) == (str(POLL_SECONDS), "7.0")
    assert POLL_ENV not in os.environ and REGROUP_TIMEOUT_ENV not in os.environ
    monkeypatch.setenv(POLL_ENV, "3")
    with group_settings(config):
        assert (os.environ[POLL_ENV], os.environ[REGROUP_TIMEOUT_ENV]) == ("3", "7.0")
    assert os.environ[POLL_ENV] == "3"


@pytest.fixture(scope="module")
def cluster():
    """A head of 1 CPU (the driver, Ray Train's controller) and 3 worker nodes of 2 CPUs, room for one worker each."""
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    for _ in range(3):
        c.add_node(num_cpus=2)
    c.wait_for_nodes()
    # Ray Train's own actors look the cluster up by RAY_ADDRESS; without it they may find another user's
    ray.init(address=c.address, logging_level="WARNING", runtime_env={"env_vars": {"RAY_ADDRESS": c.address}})
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory):
    """The undisturbed run's checkpoint, computed in-process: a fixed-size group of any worker count ends with
    the in-process engine's parameters and optimizer state to 1e-10 (tests/test_collective.py, every algorithm
    with 2 workers and maml with 1 to 3), as tests/test_worker_loss.py's reference does; a third Ray Train
    group start on the cluster (a minute) is spared."""
    run_dir = tmp_path_factory.mktemp("elastic") / "undisturbed"
    sets = [s for s in BASE if s != "engine.reduce=collective"]
    result = assemble(load_config("sinusoid", [*sets, "workers=0"])).fit(run_dir, progress=False)
    assert result["steps"] == 8
    return load_checkpoint(run_dir)


def assert_same_state(got: Any, ref: Any) -> None:
    assert got.step == ref.step == 8
    for k, v in ref.params.items():
        torch.testing.assert_close(got.params[k], v, rtol=0, atol=1e-10, msg=f"parameter {k}")
    for key, a in ref.optimizer["state"].items():
        b = got.optimizer["state"][key]
        assert float(a["step"]) == float(b["step"]) == 8
        torch.testing.assert_close(b["exp_avg"], a["exp_avg"], rtol=0, atol=1e-10)
        torch.testing.assert_close(b["exp_avg_sq"], a["exp_avg_sq"], rtol=0, atol=1e-10)
    assert got.scheduler == ref.scheduler


def starts(folder: Path) -> list[tuple[int, int, float]]:
    """(pid, step, time) of each start of rank 0's trainer."""
    return [(int(p), int(s), float(t)) for p, s, t in (x.split() for x in (folder / "starts").read_text().splitlines())]


def restart_seconds(folder: Path) -> float:
    """From the (first) disturbance to the restarted group's trainer start."""
    acted = float((folder / "acted").read_text().split()[0])
    return starts(folder)[1][2] - acted


def test_a_killed_worker_restarts_the_group_from_its_checkpoint(cluster, undisturbed, tmp_path):
    folder = tmp_path / "signals"
    folder.mkdir()
    run = assemble(load_config("sinusoid", [*BASE, "workers=3"]))
    thread = disturb(folder, kill_a_peer)
    start = time.monotonic()
    result = run.fit(tmp_path / "run", progress=False, callbacks=[PauseAt(folder, PAUSE_STEP)])
    thread.join(5)
    runs = starts(folder)
    assert len(runs) == 2, runs  # the first group, then the restarted one
    assert runs[0][1] == 0 and 0 < runs[1][1] <= 4  # restarted from a checkpoint before the pause
    assert result["workers"] == 3 and result["steps"] == 8
    assert_same_state(load_checkpoint(tmp_path / "run"), undisturbed)
    print(
        f"\nkilled worker: run {time.monotonic() - start:.1f} s, the group restarted "
        f"{restart_seconds(folder):.1f} s after the kill, from step {runs[1][1]}"
    )


def test_failures_beyond_the_limit_stop_the_run(cluster, tmp_path):
    folder = tmp_path / "signals"
    folder.mkdir()
    run = assemble(load_config("sinusoid", [*BASE, "workers=3", "engine.max_worker_failures=1"]))
    thread = disturb(folder, kill_a_peer, times=2)
    with pytest.raises(GroupFailure) as e:
        run.fit(tmp_path / "run", progress=False, callbacks=[PauseAt(folder, PAUSE_STEP, times=2)])
    thread.join(5)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("the worker group failed 2 times (last: rank ")
    assert message.endswith(
        f"more than engine.max_worker_failures = 1 allows; the run stops; its last checkpoint is in "
        f"{tmp_path / 'run'}, --resume {tmp_path / 'run'} continues it"
    )
    assert len(starts(folder)) == 2


def test_a_group_that_loses_a_node_goes_on_smaller_and_ends_where_the_fixed_size_run_ends(
    cluster, undisturbed, tmp_path
):
    folder = tmp_path / "signals"
    folder.mkdir()

    def remove_a_peer_node(rank0_pid: int) -> None:
        rank0_node = next(w["node"] for w in group_workers() if w["pid"] == rank0_pid)
        peer_nodes = {w["node"] for w in group_workers()} - {rank0_node}
        node = next(n for n in cluster.worker_nodes if n.node_id in peer_nodes)
        cluster.remove_node(node)

    run = assemble(load_config("sinusoid", [*BASE, "workers=[2,3]"]))
    thread = disturb(folder, remove_a_peer_node)
    result = run.fit(tmp_path / "run", progress=False, callbacks=[PauseAt(folder, PAUSE_STEP)])
    thread.join(5)
    runs = starts(folder)
    assert len(runs) == 2, runs
    assert result["workers"] == 2 and result["steps"] == 8  # the group went on with 2
    assert_same_state(load_checkpoint(tmp_path / "run"), undisturbed)
    print(
        f"\nlost node: the group restarted with 2 workers {restart_seconds(folder):.1f} s after the removal, "
        f"from step {runs[1][1]}"
    )


def test_a_group_that_a_node_joins_grows_and_ends_where_the_fixed_size_run_ends(cluster, undisturbed, tmp_path):
    # Ray Train counts the nodes' total resources (``ray.nodes()``), not their free ones: room appears
    # when a node joins. ``Cluster.add_node`` must run in the main thread (it sets signal handlers),
    # so here the run goes in a thread and the main thread acts at rank 0's pause.
    folder = tmp_path / "signals"
    folder.mkdir()
    while len(cluster.worker_nodes) > 2:  # room for 2 workers at the start (the test above leaves 2)
        cluster.remove_node(list(cluster.worker_nodes)[-1])
    deadline = time.monotonic() + 60
    while sum(n["Alive"] for n in ray.nodes()) > 3:
        assert time.monotonic() < deadline, "Ray still counts a removed node alive"
        time.sleep(0.2)
    run = assemble(load_config("sinusoid", [*BASE, "workers=[2,3]", "engine.resize_interval=1"]))
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = run.fit(tmp_path / "run", progress=False, callbacks=[PauseAt(folder, PAUSE_STEP)])
        except BaseException as e:  # shown by the assertion below
            outcome["error"] = e

    def add_a_node(rank0_pid: int) -> None:
        """Room for a third worker; rank 0 stays paused until the controller has restarted the group."""
        cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        deadline = time.monotonic() + 300
        while len(starts(folder)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    assert act_at_pause(folder, add_a_node, set(), alive=thread.is_alive), f"rank 0 never paused: {outcome}"
    thread.join(300)
    assert not thread.is_alive() and "error" not in outcome, outcome
    runs = starts(folder)
    assert len(runs) == 2, runs  # the group of 2, then the larger one
    assert runs[0][1] == 0 and 0 < runs[1][1] <= 4  # restarted from a checkpoint before the pause
    assert outcome["result"]["workers"] == 3 and outcome["result"]["steps"] == 8  # the group grew to 3
    assert_same_state(load_checkpoint(tmp_path / "run"), undisturbed)
    print(
        f"\nnode joined: the group restarted with 3 workers {restart_seconds(folder):.1f} s after the node was added, "
        f"from step {runs[1][1]}"
    )
