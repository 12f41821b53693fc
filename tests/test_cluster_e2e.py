"""The path of `ray submit`: a real head from `ray start --head`, the entry script copied alone and run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rayhead import start_head
from userpkg import SETS, assert_shipped, worker_calls, write_package

SUBMIT = Path(__file__).resolve().parent.parent / "cluster" / "submit.py"
WORKERS = 2
STEPS = 6


@pytest.fixture(scope="module")
def head():
    h = start_head(num_cpus=3, resources='{"distmaml_e2e_head": 1}')  # the driver's bundle and 2 workers
    try:
        yield h
    finally:
        h.stop()
        assert h.pids() == []  # every process of this head ended, and no other Ray process was touched


@pytest.mark.slow
def test_submit_runs_train_on_the_cluster(head, tmp_path):
    # ray submit copies the one script to the head and runs `python <script> <args after -->` there
    workdir = tmp_path / "head-home"
    workdir.mkdir()
    script = workdir / "submit.py"
    shutil.copy(SUBMIT, script)
    run = tmp_path / "run"
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [
        "train", "--quiet", "--out", str(run), "--set", f"meta.steps={STEPS}", "--set", f"workers={WORKERS}",
        "--set", "meta.batch_size=4", "--set", "meta.test_tasks=8", "--set", "meta.val_tasks=8",
        "--set", f"tracking.uri={tracking_uri}", "--set", "tracking.experiment=e2e",
    ]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, str(script), *args], cwd=workdir, env=head.env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # it joined that head (its custom resource), not a private instance of its own
    assert f"joined the Ray cluster at {head.address}" in proc.stdout
    assert "'distmaml_e2e_head': 1.0" in proc.stdout
    result = json.loads((run / "result.json").read_text())
    assert result["steps"] == STEPS and result["workers"] == WORKERS
    assert result["meta_test"]["metric"] == "mse" and result["meta_test"]["tasks"] == 8
    assert sorted(p.name for p in (run / "checkpoints").iterdir())[-1] == f"step_{STEPS:09d}.pt"
    assert "meta-test, 8 held-out tasks" in proc.stdout
    # the run is in MLflow at the tracking URI given, finished, with its config and meta-test
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("e2e").experiment_id])
    assert len(runs) == 1 and f"MLflow run {runs[0].info.run_id} in {tracking_uri}" in proc.stdout
    mlrun = runs[0]
    assert mlrun.info.status == "FINISHED"
    assert mlrun.data.params["workers"] == str(WORKERS) and mlrun.data.params["meta.steps"] == str(STEPS)
    assert mlrun.data.metrics["test_mse"] == pytest.approx(result["meta_test"]["mean"])
    assert [m.step for m in client.get_metric_history(mlrun.info.run_id, "train_loss")] == list(range(1, STEPS + 1))


@pytest.mark.slow
def test_submit_ships_the_users_package_to_the_workers(head, tmp_path):
    """`model.name: blobs.mod:make` from the folder submit.py runs in: the job's runtime environment carries it."""
    workdir = tmp_path / "head-home"
    workdir.mkdir()
    log = tmp_path / "calls.jsonl"
    write_package(workdir, log)
    shutil.copy(SUBMIT, workdir / "submit.py")
    sets = [*SETS, "meta.steps=2", "meta.val_every=0", "meta.test_tasks=8", "workers=2"]
    args = ["train", "--quiet", "--out", str(tmp_path / "run"), *(a for s in sets for a in ("--set", s))]
    proc = subprocess.run(
        [sys.executable, "submit.py", *args],
        cwd=workdir,
        env=head.env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"joined the Ray cluster at {head.address}" in proc.stdout
    assert json.loads((tmp_path / "run" / "result.json").read_text())["meta_test"]["metric"] == "accuracy"
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    driver = {c["pid"] for c in calls if Path(c["cwd"]).resolve() == workdir.resolve()}
    assert_shipped(worker_calls(log, driver), workdir)


@pytest.mark.slow
def test_the_driver_bundle_counts_on_a_head_without_an_autoscaler(head, tmp_path):
    # 3 workers x 1 CPU would fit the head's 3 CPUs; with the driver's bundle they never can
    script = tmp_path / "submit.py"
    shutil.copy(SUBMIT, script)
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(script), "train", "--quiet", "--workers", "3"], cwd=tmp_path, env=head.env,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "distmaml: error: the run needs 4 CPUs (driver 1 + 3 workers x 1) but the Ray cluster has at most 3; "
        "lower workers or engine.cpus_per_worker or engine.driver_cpus, or add nodes"
    )
    assert time.monotonic() - start < 60  # start-up included; waiting would have taken engine.startup_timeout = 120 s


@pytest.mark.slow
def test_submit_fails_fast_without_a_cluster(tmp_path):
    script = tmp_path / "submit.py"
    shutil.copy(SUBMIT, script)
    from rayhead import free_port

    env = {"RAY_ADDRESS": f"127.0.0.1:{free_port()}", "PATH": "/usr/bin:/bin"}
    import os

    env.update({k: v for k, v in os.environ.items() if k in ("PYTHONPATH", "HOME", "VIRTUAL_ENV")})
    proc = subprocess.run(
        [sys.executable, str(script), "train", "--quiet"], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 3  # ClusterError: the cluster cannot go on
    assert proc.stderr.startswith(f"distmaml: error: --address {env['RAY_ADDRESS']}: no Ray cluster answers")


def _run_submit(tmp_path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "submit.py"
    shutil.copy(SUBMIT, script)
    args = ["evaluate", "--checkpoint", str(tmp_path / "no-run")]
    return subprocess.run(
        [sys.executable, str(script), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_token_from_the_environment_is_used_for_an_explicit_address(head, tmp_path):
    # RAY_AUTH_MODE unset, the token in RAY_AUTH_TOKEN: Ray alone would send no token to an explicit address
    env = {k: v for k, v in head.env.items() if k != "RAY_AUTH_MODE"}
    proc = _run_submit(tmp_path, env)
    assert f"joined the Ray cluster at {head.address}" in proc.stdout, proc.stderr[-2000:]
    assert proc.returncode == 2 and "no checkpoints found" in proc.stderr  # then evaluate runs, and says why not


@pytest.mark.slow
def test_a_missing_token_is_reported_as_such(head, tmp_path):
    env = {k: v for k, v in head.env.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
    proc = _run_submit(tmp_path, env)
    assert proc.returncode == 3
    assert "the cluster refused this client's authentication token; set RAY_AUTH_MODE=token" in proc.stderr


@pytest.mark.slow
def test_a_token_at_hand_does_not_stop_joining_a_cluster_without_auth(tmp_path):
    # connect turns token mode on whenever a token is at hand; a cluster without authentication must still accept us
    plain = start_head(num_cpus=1, token_auth=False)
    try:
        env = {k: v for k, v in plain.env.items() if k != "RAY_AUTH_MODE"}
        env["RAY_AUTH_TOKEN"] = "f" * 64  # some other cluster's token, in the environment
        proc = _run_submit(tmp_path, env)
        assert f"joined the Ray cluster at {plain.address}" in proc.stdout, proc.stderr[-2000:]
        assert proc.returncode == 2 and "no checkpoints found" in proc.stderr
    finally:
        plain.stop()
    assert plain.pids() == []
