"""``distmaml tune --storage s3://...``: trial checkpoints and results in a bucket, on the local S3 server (moto).

The S3 server starts before Ray, so every trial process inherits its endpoint
and credentials, as the nodes of a cluster would from their environment.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import ray
from test_tune import _children, _client, _steps, space_file

from distmaml import storage
from distmaml.cli import main
from distmaml.tune import load_space, run_sweep
from distmaml.tune.shared import check_tracking_reach, launched_elsewhere, tune_storage


@pytest.fixture(scope="module")
def s3():
    from s3server import s3_server

    with s3_server(("sweeps",)) as endpoint:
        yield endpoint


@pytest.fixture(scope="module", autouse=True)
def ray_instance(s3):
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture
def here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _keys(uri: str) -> list[str]:
    fs, root = storage.resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return sorted(i.path[len(root) + 1 :] for i in infos if i.type == pafs.FileType.File)


def test_a_bucket_is_tunes_storage_and_a_missing_one_fails_at_once(here, capsys):
    where = tune_storage("s3://sweeps/a")
    assert (where.path, where.scheme) == ("sweeps/a", "s3")
    assert isinstance(where.filesystem, pafs.S3FileSystem)
    assert where.locate("sweeps/a/x/checkpoint_000001") == "s3://sweeps/a/x/checkpoint_000001"
    assert tune_storage(here / "r").filesystem is None

    path = space_file(here, "nobucket")
    assert main(["tune", "--space", str(path), "--quiet", "--storage", "s3://no-such-bucket/sweeps"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("distmaml: error: --storage s3://no-such-bucket/sweeps: cannot write there")
    assert "\n" not in err


def test_a_trial_checkpoint_in_the_bucket_gives_mlflow_its_last_records(here, monkeypatch, capsys):
    """A trial's checkpoint in the bucket holds its outbox (what MLflow had not taken when it was written):
    the sweep's end finds it and sends it (``sweep._waiting`` and ``_deliver_checkpoints``), and so does
    ``distmaml sync s3://...``, the command the sweep names; both read a local copy of the outbox only."""
    from mlflow import MlflowClient

    from distmaml.tracking.outbox import Outbox
    from distmaml.tracking.sync import SyncError, sync_run
    from distmaml.tune.report import TrialRow
    from distmaml.tune.sweep import _deliver_checkpoints, _waiting

    monkeypatch.setenv(storage.CACHE_ENV, str(here / "cache"))
    uri = f"sqlite:///{here}/mlflow.db"
    checkpoints = []
    for trial in ("t1", "t2"):
        box = Outbox(here / trial / "tracking")
        box.append({"kind": "create", "key": trial, "uri": uri, "experiment": "e", "run_name": trial, "tags": {},
                    "start_time": 1_700_000_000_000})  # fmt: skip
        for step in (1, 2, 3):
            box.append({"kind": "metrics", "metrics": [["train_loss", 1.0 / step, 1_700_000_000_000 + step, step]]})
        box.append({"kind": "end", "status": "KILLED", "end_time": 1_700_000_100_000})
        box.close()
        (here / trial / "model.pt").write_bytes(b"weights")  # a checkpoint's other files stay in the bucket
        checkpoints.append(f"s3://sweeps/b/{trial}/checkpoint_000003")
        storage.upload_dir(here / trial, checkpoints[-1])
    rows = [TrialRow(t, "stopped", {}, 0.5, 3, c) for t, c in zip(("t1", "t2"), checkpoints, strict=True)]
    assert _waiting(rows) == {"t1": checkpoints[0], "t2": checkpoints[1]}
    assert not any((here / "cache").rglob("model.pt"))

    assert _deliver_checkpoints(rows[:1], uri) == {}  # the sweep's end, for the first trial
    assert main(["sync", checkpoints[1]]) == 0  # the command, for the second
    out = capsys.readouterr().out
    assert out.startswith(f"{checkpoints[1]}: sent 5 records to MLflow run ") and out.endswith(" (KILLED)\n")
    assert _waiting(rows) == {}
    client = MlflowClient(tracking_uri=uri)
    for run in client.search_runs([client.get_experiment_by_name("e").experiment_id]):
        assert run.info.status == "KILLED"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2, 3]
    assert sync_run(checkpoints[0]).sent == 0  # once: the copy counts what MLflow took
    with pytest.raises(SyncError, match="s3://sweeps/b/none/tracking/outbox.jsonl is missing"):
        sync_run("s3://sweeps/b/none")


@pytest.mark.slow
def test_a_crashed_trial_resumes_from_its_checkpoint_in_the_bucket(here):
    """The first attempt reports step 2, deletes its run folder and dies; the restart downloads step 2 from S3."""
    uri = "s3://sweeps/crash"
    result = run_sweep(
        load_space(space_file(here, "s3crash", max_failures=1)), storage=uri, verbose=0, exit_after_step=2
    )
    (row,) = result.rows
    assert (row.status, row.step, row.resumed_from) == ("done", 6, 2)
    assert result.storage == uri and row.checkpoint is not None and row.checkpoint.startswith(f"{uri}/s3crash-")

    keys = _keys(uri)
    assert sum(k.endswith("/error.txt") for k in keys) == 1  # Tune saw the crash; its record is in the bucket
    # the trial's MLflow outbox travels with its checkpoint (docs/tracking.md), whatever it still holds
    assert _keys(row.checkpoint) == [
        "checkpoints/step_000000006.pt",
        "config.yaml",
        "mlflow_run_id",
        "result.json",
        "tracking/outbox.jsonl",
        "tracking/state.json",
    ]
    # no copy of a checkpoint on this node's disk: not in Ray's session folder, no run folder of the trial left
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    assert not list(session.rglob("step_*.pt"))
    assert not list(Path(tempfile.gettempdir()).glob(f"distmaml-{row.trial}-*"))

    client = _client(here)
    _, (child,) = _children(client, "s3crash")  # the restart continued the same MLflow run
    assert child.info.status == "FINISHED"
    assert _steps(client, child.info.run_id, "train_loss") == [1, 2, 3, 4, 5, 6]

    # the best checkpoint, a URI, is a run directory that distmaml evaluate takes
    assert main(["evaluate", "--checkpoint", row.checkpoint, "--tasks", "4"]) == 0
    evaluated = json.loads(storage.read_bytes(storage.join(row.checkpoint, "eval.json")))
    assert evaluated["step"] == 6 and evaluated["meta_test"]["tasks"] == 4


@pytest.mark.parametrize(
    ("uri", "elsewhere", "refused"),
    [
        ("sqlite:////tmp/mlflow.db", None, False),  # one machine: a file works
        ("http://127.0.0.1:5000", None, False),
        ("sqlite:////tmp/mlflow.db", "node 10.0.0.11 is another machine", True),
        ("http://localhost:5000", "the autoscaler can launch nodes of type gpu_worker (provider aws)", True),
        ("http://127.0.0.1:5000", "node 10.0.0.11 is another machine", True),
        ("http://10.0.0.10:5000", "node 10.0.0.11 is another machine", False),
    ],
)
def test_a_tracking_uri_other_machines_cannot_reach_is_refused_where_trials_may_go(uri, elsewhere, refused):
    from distmaml.config import ConfigError

    if not refused:
        check_tracking_reach(uri, elsewhere)
        return
    with pytest.raises(ConfigError, match=r"tracking.uri = .*but trials may run on other machines") as e:
        check_tracking_reach(uri, elsewhere)
    assert "tracking.uri=http://HEAD_PRIVATE_IP:5000" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("provider", "here", "elsewhere"),
    [
        # the local provider starts nodes at its worker_ips only: loopback ones are this machine (test_launcher)
        ({"type": "local", "head_ip": "127.0.0.2", "worker_ips": ["127.0.0.3", "127.0.0.4"]}, "127.0.0.2", False),
        ({"type": "local", "head_ip": "10.0.0.10", "worker_ips": ["10.0.0.10"]}, "10.0.0.10", False),
        ({"type": "local", "head_ip": "10.0.0.10", "worker_ips": ["10.0.0.11"]}, "10.0.0.10", True),
        ({"type": "local", "head_ip": "127.0.0.2", "worker_ips": ["127.0.0.3", "10.0.0.11"]}, "127.0.0.2", True),
        ({"type": "fake_multinode"}, "127.0.0.1", False),
        ({"type": "aws", "region": "us-west-2"}, "10.0.0.10", True),
        ({}, "10.0.0.10", True),  # a cluster file without a provider: anything may be launched anywhere
    ],
)
def test_nodes_a_cluster_file_may_launch_are_elsewhere_unless_its_addresses_are_this_machine(provider, here, elsewhere):
    why = launched_elsewhere({"provider": provider}, ["local.cluster.node"], here)
    assert (why is not None) == elsewhere
    if elsewhere:
        assert (
            why
            == f"the autoscaler can launch nodes of type local.cluster.node (provider {provider.get('type', 'unknown')})"
        )


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ("10.0.0.10", "10.0.0.10", True),
        ("10.0.0.10", "10.0.0.11", False),
        ("127.0.0.2", "127.0.0.3", True),  # raylets at their own loopback addresses: one machine (tests/sshnodes.py)
        ("127.0.0.1", "::1", True),
        ("127.0.0.2", "10.0.0.11", False),
    ],
)
def test_nodes_at_loopback_addresses_are_one_machine(a, b, same):
    from distmaml.tune.shared import same_machine

    assert same_machine(a, b) is same and same_machine(b, a) is same
