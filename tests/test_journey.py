"""The README's "Run on a cluster" commands through ``ray submit``, in the layout where they really run.

One local autoscaling cluster shaped like cluster/config.yaml (tests/fakecluster.py: a head with no CPUs,
``gpu_worker`` nodes with the YAML's resources, none up at the start) with its dashboard, an MLflow server
on the head's address and port (as head_start_ray_commands start it) and an S3 server standing in for
the user's bucket. Everything listens on loopback.

- ``ray submit``: the head's home folder is a temporary HOME holding ``submit.py`` (``ray submit`` copies
  it there) and ``distmaml/``, the project as ``file_mounts`` copies a fresh clone (``rsync_exclude``
  applied), with a package of the user's own kept in it; ``ray up`` writes ``~/ray_bootstrap_config.yaml``,
  which is the config the head's autoscaler runs with here. Commands run as ``python ~/submit.py ARGS``
  from HOME.
- the Jobs API: tests/test_jobs.py.

The README's commands are read from the README; a tiny budget is added to each (``--set meta.steps=2``...).
"""

from __future__ import annotations

import ipaddress
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from fakecluster import start_fake_cluster
from mlflowserver import mlflow_server
from projectcopy import ROOT, mounted_project
from rayhead import free_port, listening_addresses
from s3server import s3_server
from userpkg import SETS, assert_shipped, worker_calls, write_package

from distmaml.machine.environ import environ

pytestmark = pytest.mark.slow
BUCKET = "your-bucket"  # the README's YOUR-BUCKET (S3 bucket names are lower case)
TINY = ["meta.steps=2", "meta.batch_size=4", "meta.val_tasks=4", "meta.test_tasks=4"]
TINY_TUNE = [*TINY, "meta.val_every=1", "meta.checkpoint_every=1", "tracking.log_model=false"]


def readme_commands(prefix: str) -> list[list[str]]:
    """The commands of the README's "Run on a cluster" section that start with ``prefix``, as argv lists."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Run on a cluster", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        joined = re.sub(r"\\\n\s*", "", block)
        for line in joined.splitlines():
            line = line.split("  #", 1)[0].strip()
            if line.startswith(prefix):
                commands.append(line.replace("YOUR-BUCKET", BUCKET).split())
    return commands


def worker_node_types() -> dict:
    """cluster/config.yaml's GPU node type: its resources, min_workers 0, at most 2 nodes on this machine."""
    config = yaml.safe_load((ROOT / "cluster" / "config.yaml").read_text())
    head = config["head_node_type"]
    return {
        name: {"resources": spec["resources"], "min_workers": spec.get("min_workers", 0), "max_workers": 2}
        for name, spec in config["available_node_types"].items()
        if name != head
    }


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    home = tmp_path_factory.mktemp("head-home")
    project = mounted_project(home / "distmaml")
    write_package(project, home / "calls.jsonl")  # the user's own package, kept in the project folder
    shutil.copy(ROOT / "cluster" / "submit.py", home / "submit.py")  # what ray submit copies
    return home


@pytest.fixture(scope="module")
def cluster(home, tmp_path_factory):
    """S3 and MLflow first: the head, its autoscaler and every node it starts inherit their environment."""
    folder = tmp_path_factory.mktemp("mlflow")
    port, dashboard = free_port(), free_port()
    with s3_server((BUCKET,)), mlflow_server(folder, "127.0.0.1", port) as uri:
        # the head's processes run in its home folder: its autoscaler hashes the mounts there, as on a real head
        with environ({"DISTMAML_MLFLOW_PORT": str(port), "HOME": str(home)}):
            c = start_fake_cluster(
                worker_node_types(),
                max_workers=2,
                config_path=home / "ray_bootstrap_config.yaml",
                file_mounts={"~/distmaml": "~/distmaml"},  # as `ray up` rewrites them for the head
                dashboard_port=dashboard,
            )
            c.mlflow_uri = uri  # type: ignore[attr-defined]
            c.dashboard_url = f"http://127.0.0.1:{dashboard}"  # type: ignore[attr-defined]
            try:
                yield c
            finally:
                c.stop()
                assert c.head.pids() == []


def _submit(home: Path, cluster, args: list[str]) -> tuple[subprocess.CompletedProcess[str], float]:
    """``python ~/submit.py ARGS`` from the head's home folder, as ``ray submit`` runs it."""
    submitted = time.time()
    proc = subprocess.run(
        [sys.executable, str(home / "submit.py"), *args],
        cwd=home,
        env={**cluster.env, "HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"distmaml: running in the project folder {home / 'distmaml'}" in proc.stdout
    assert f"joined the Ray cluster at {cluster.address}" in proc.stdout
    assert f"tracking to the head's MLflow server: --set tracking.uri={cluster.mlflow_uri}" in proc.stdout
    return proc, submitted


def _sets(values: list[str]) -> list[str]:
    return [a for v in values for a in ("--set", v)]


def _first_step_seconds(uri: str, experiment: str, submitted: float) -> float:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id], order_by=["start_time DESC"])
    history = client.get_metric_history(runs[0].info.run_id, "train_loss")
    assert runs[0].info.status == "FINISHED" and [m.step for m in history][:1] == [1]
    return history[0].timestamp / 1000 - submitted


def test_ray_submit_train_from_the_readme(home, cluster):
    (command,) = [c for c in readme_commands("ray submit") if "train" in c]
    args = command[command.index("--") + 1 :]
    assert args[:1] == ["train"] and "--out" in args
    proc, submitted = _submit(home, cluster, [*args, "--quiet", *_sets([*TINY, "tracking.experiment=journey"])])
    waits = [line for line in proc.stderr.splitlines() if line.startswith("distmaml: waiting")]
    assert waits, proc.stderr[-3000:]  # no GPU node was up: the run waited for the autoscaler
    out = args[args.index("--out") + 1]
    assert f"run written to {out}" in proc.stdout and out.startswith(f"s3://{BUCKET}/")
    seconds = _first_step_seconds(cluster.mlflow_uri, "journey", submitted)
    print(f"\nray submit train: submit to the first meta-step {seconds:.1f} s; it printed:", *waits, sep="\n")


def test_ray_submit_tune_from_the_readme(home, cluster):
    (command,) = [c for c in readme_commands("ray submit") if "tune" in c]
    args = command[command.index("--") + 1 :]
    assert args[:3] == ["tune", "--space", "tune_spaces/sinusoid.yaml"]  # relative: the project folder's
    proc, _ = _submit(home, cluster, [*args, "--quiet", "--trials", "1", *_sets(TINY_TUNE)])
    best = next(line for line in proc.stdout.splitlines() if line.startswith("best checkpoint: "))
    storage = args[args.index("--storage") + 1]
    assert best.removeprefix("best checkpoint: ").startswith(f"{storage}/sinusoid-")


def test_ray_submit_train_with_the_users_package_in_the_project(home, cluster):
    sets = [*SETS, *TINY, "meta.val_every=0", "workers=2", "tracking.enabled=true", "tracking.experiment=own"]
    proc, _ = _submit(home, cluster, ["train", "--quiet", "--out", f"s3://{BUCKET}/runs/own", *_sets(sets)])
    assert "meta-test, 4 held-out tasks" in proc.stdout
    log = home / "calls.jsonl"
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    project = home / "distmaml"
    driver = {c["pid"] for c in calls if Path(c["cwd"]).resolve() == project.resolve()}
    assert driver  # the driver imported it from the project folder, where submit.py moved
    assert_shipped(worker_calls(log, driver), project)


def test_every_process_of_the_cluster_listens_on_loopback_only(cluster):
    """Its head, dashboard, agents and the worker nodes the autoscaler started: 127.0.0.1, never this
    machine's network address, which Ray alone would take (tests/rayhead.py, LOOPBACK_ONLY)."""
    listening = listening_addresses(cluster.head.pids())
    assert cluster.dashboard_url.rsplit(":", 1)[1] in {a.rsplit(":", 1)[1] for a in listening}
    off = {a: c for a, c in listening.items() if not ipaddress.ip_address(a.rsplit(":", 1)[0]).is_loopback}
    assert off == {}
