"""The README's Jobs API door: ``ray job submit --address http://HEAD:8265 --working-dir . -- distmaml ...``.

A head started with ``ray start --head`` and its dashboard (tests/rayhead.py), 4 CPUs, token authentication
on as in Ray 2.60; an MLflow server on the head's address and port (as cluster/config.yaml starts it) and an
S3 server standing in for the user's bucket; all on loopback. Each job uploads a fresh copy of the project
(tracked files, a package of the user's own written in) as its ``--working-dir``; the client gets the
cluster's token as the README says (``RAY_AUTH_MODE=token``, ``RAY_AUTH_TOKEN``).

Not on tests/test_journey.py's fake autoscaling cluster: its worker "nodes" share the head's temporary
folder, so a worker node's runtime-env agent deletes the job's unpacked ``working_dir`` (the driver's
current folder) when its own last user of it ends, which separate machines never do.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflowserver import mlflow_server
from projectcopy import mounted_project
from rayhead import free_port, start_head
from s3server import s3_server
from test_journey import BUCKET, TINY, TINY_TUNE, _sets, readme_commands
from userpkg import SETS, write_package

from distmaml.machine.environ import environ

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlflow")
    port, dashboard = free_port(), free_port()
    with s3_server((BUCKET,)), mlflow_server(folder, "127.0.0.1", port) as uri:
        with environ({"DISTMAML_MLFLOW_PORT": str(port)}):
            head = start_head(
                num_cpus=4,
                extra_args=[
                    "--include-dashboard",
                    "true",
                    "--dashboard-host",
                    "127.0.0.1",
                    "--dashboard-port",
                    str(dashboard),
                ],
            )
        head.mlflow_uri = uri  # type: ignore[attr-defined]
        head.dashboard_url = f"http://127.0.0.1:{dashboard}"  # type: ignore[attr-defined]
        try:
            yield head
        finally:
            head.stop()
            assert head.pids() == []


def _job(cluster, tmp_path: Path, command: list[str], extra: list[str]) -> subprocess.CompletedProcess[str]:
    """The README's ``ray job submit`` command against this cluster's dashboard, with a fresh copy as ``.``."""
    project = mounted_project(tmp_path / "project")
    write_package(project, tmp_path / "calls.jsonl")
    argv = list(command)
    argv[argv.index("--address") + 1] = cluster.dashboard_url
    argv[argv.index("--working-dir") + 1] = str(project)
    argv[0] = str(Path(sys.executable).with_name("ray"))
    token = {k: cluster.env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}  # what the README says to set
    env = {k: v for k, v in cluster.env.items() if not k.startswith("RAY_")}
    proc = subprocess.run(
        [*argv, *extra], cwd=tmp_path, env={**env, **token}, capture_output=True, text=True, timeout=1200
    )
    assert proc.returncode == 0 and "succeeded" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-3000:]
    assert f"tracking to the head's MLflow server: --set tracking.uri={cluster.mlflow_uri}" in proc.stdout
    return proc


def test_ray_job_submit_tune_from_the_readme(cluster, tmp_path):
    (command,) = [c for c in readme_commands("ray job submit") if "tune" in c]
    assert command[command.index("--") + 1 :][:4] == ["distmaml", "tune", "--space", "tune_spaces/sinusoid.yaml"]
    proc = _job(cluster, tmp_path, command, ["--quiet", "--trials", "1", *_sets(TINY_TUNE)])
    assert f"best checkpoint: s3://{BUCKET}/" in proc.stdout


def test_ray_job_submit_train_with_the_users_package(cluster, tmp_path):
    (command,) = [c for c in readme_commands("ray job submit") if "tune" in c]
    head = command[: command.index("--") + 1]  # ray job submit --address ... --working-dir . --
    sets = [*SETS, *TINY, "meta.val_every=0", "workers=2", "tracking.enabled=true"]
    proc = _job(cluster, tmp_path, [*head, "distmaml", "train", "--quiet"], _sets(sets))
    assert "meta-test, 4 held-out tasks" in proc.stdout
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert {c["what"] for c in calls} == {"model", "family"}
    for c in calls:  # the driver and every worker imported it from Ray's copy of the job's working_dir
        assert "/runtime_resources/working_dir_files/" in c["file"], c["file"]
    assert len({c["pid"] for c in calls}) >= 3  # the driver and two workers
