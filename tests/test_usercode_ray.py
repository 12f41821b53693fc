"""A package distmaml has never seen, written to a temporary folder, meta-trained on 2 Ray workers.

The workers must import it through Ray's runtime environment (the job's
``working_dir``, a copy of the package), not from the folder the command
runs in: each call of the user's code logs its process, file and ``sys.path``
to a file the test reads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from userpkg import SETS, assert_shipped, worker_calls, write_package

import distmaml
from distmaml.run.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _distmaml(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(ROOT)  # distmaml from this checkout; the package from nowhere
    exe = Path(sys.executable).parent / "distmaml"  # the console script: its sys.path[0] is not the folder
    return subprocess.run([str(exe), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture
def project(tmp_path):
    """The package written into a folder of its own; the log of its calls beside it."""
    folder, log = tmp_path / "project", tmp_path / "calls.jsonl"
    folder.mkdir()
    write_package(folder, log)
    return folder, log


@pytest.mark.slow
def test_cli_runs_a_package_it_has_never_seen_on_2_workers_evaluates_and_resumes(project):
    folder, log = project
    args = ["train", "--quiet", "--workers", "2", "--out", "run"]
    sets = [a for s in [*SETS, "meta.steps=30", "meta.checkpoint_every=15", "meta.val_every=15"] for a in ("--set", s)]
    done = _distmaml([*args, *sets], folder)
    assert done.returncode == 0, done.stderr[-3000:]
    run = folder / "run"
    result = json.loads((run / "result.json").read_text())
    assert result["workers"] == 2 and result["steps"] == 30
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    driver = {c["pid"] for c in calls if Path(c["cwd"]).resolve() == folder.resolve()}
    assert len(driver) == 1  # the driver imported it from the folder, as `python -m` would
    assert_shipped(worker_calls(log, driver), folder)
    test, unadapted = result["meta_test"], result["meta_test_unadapted"]
    assert test["metric"] == "accuracy" and test["tasks"] == 60
    assert test["mean"] > unadapted["mean"] + 0.1, (test, unadapted)

    done = _distmaml(["evaluate", "--checkpoint", "run", "--tasks", "30"], folder)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((run / "eval.json").read_text())["meta_test"]["tasks"] == 30

    # --resume: drop the last checkpoint, continue from step 15 on 2 workers, end with the same parameters
    final = load_checkpoint(run).params
    (run / "checkpoints" / "step_000000030.pt").unlink()
    log.unlink()
    done = _distmaml(["train", "--quiet", "--resume", "run"], folder)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = load_checkpoint(run)
    assert resumed.step == 30
    for k, v in final.items():
        assert torch.allclose(resumed.params[k], v, atol=1e-10), k
    driver = {c["pid"] for c in (json.loads(x) for x in log.read_text().splitlines()) if c["cwd"] == str(folder)}
    assert_shipped(worker_calls(log, driver), folder)


@pytest.fixture
def blobs(tmp_path, monkeypatch):
    """The package importable in this process only (its folder on this process's sys.path, not the workers')."""
    folder = tmp_path / "project"
    folder.mkdir()
    write_package(folder, tmp_path / "calls.jsonl")
    monkeypatch.syspath_prepend(str(folder))
    import blobs.mod

    yield folder, blobs.mod, tmp_path / "calls.jsonl"
    for name in [m for m in sys.modules if m == "blobs" or m.startswith("blobs.")]:
        del sys.modules[name]


def _notebook_tasks(module):
    """A task family defined inside a function, as in a notebook: cloudpickle sends it by value."""

    class NotebookBlobs(module.Blobs):
        pass

    return NotebookBlobs


@pytest.mark.slow
def test_cli_runs_the_package_through_the_collective_engine_with_tracking_on(project):
    """engine.reduce=collective: the Ray Train workers get the package the same way; MLflow on (the default)."""
    folder, log = project
    sets = [s for s in SETS if s != "tracking.enabled=false"]
    sets += ["meta.steps=30", "meta.val_every=15", "engine.reduce=collective"]
    done = _distmaml(
        ["train", "--quiet", "--workers", "2", "--out", "run", *[a for s in sets for a in ("--set", s)]], folder
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((folder / "run" / "result.json").read_text())
    assert result["workers"] == 2 and result["steps"] == 30
    assert result["mlflow_run_id"] and (folder / "mlflow.db").is_file()
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    driver = {c["pid"] for c in calls if Path(c["cwd"]).resolve() == folder.resolve()}
    assert len(driver) == 1
    assert_shipped(worker_calls(log, driver), folder)
    test, unadapted = result["meta_test"], result["meta_test_unadapted"]
    assert test["mean"] > unadapted["mean"] + 0.1, (test, unadapted)


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_distmaml_train_with_callables(blobs, workers, tmp_path):
    folder, mod, log = blobs
    sets = [s for s in SETS if not s.startswith(("model.name", "data.family"))]
    result = distmaml.train(
        "sinusoid",
        model=mod.make,
        tasks=_notebook_tasks(mod),
        out=tmp_path / "run",
        workers=workers,
        overrides=[*sets, "meta.steps=30", "meta.val_every=0"],
    )
    assert result == json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["workers"] == workers
    assert result["meta_test"]["mean"] > result["meta_test_unadapted"]["mean"] + 0.1, result
    config = load_checkpoint(tmp_path / "run").config
    assert config["model"]["name"] == "blobs.mod:make"
    assert config["data"]["family"].endswith("_notebook_tasks.<locals>.NotebookBlobs")
    assert config["data"]["loss"] == "cross_entropy"
    if workers:
        assert_shipped(worker_calls(log, {os.getpid()}), folder)


@pytest.mark.slow
def test_a_sweep_ships_the_package_to_its_trials_and_their_workers(project, tmp_path):
    """`distmaml tune` from the folder: each trial (a Tune actor) and its engine's workers import Ray's copy."""
    folder, log = project
    fixed = dict(s.split("=", 1) for s in SETS)
    fixed.update({"meta.steps": "4", "meta.val_every": "2", "meta.test_tasks": "8", "workers": "1"})
    space = {
        "name": "blobs",
        "base": "sinusoid",
        "set": {k: yaml.safe_load(v) for k, v in fixed.items()},
        "metric": "val_accuracy",
        "scheduler": "fifo",
        "num_samples": 1,
        "max_failures": 0,
        "resources": {"workers": 1, "driver_cpus": 0.5},
        "space": {"inner.lr": {"choice": [0.3, 0.5]}},
    }
    (folder / "blobs.yaml").write_text(yaml.safe_dump(space, sort_keys=False))
    done = _distmaml(["tune", "--space", "blobs.yaml", "--quiet", "--storage", str(tmp_path / "sweeps")], folder)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "1 trials of blobs" in done.stdout
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    driver = {c["pid"] for c in calls if Path(c["cwd"]).resolve() == folder.resolve()}  # load_space asked the loss
    shipped = worker_calls(log, driver)
    assert len({c["pid"] for c in shipped}) >= 2  # the trial and its worker
    for c in shipped:
        assert "/runtime_resources/working_dir_files/" in c["file"], c["file"]
        assert all(not p or Path(p).resolve() != folder.resolve() for p in c["sys_path"]), c["sys_path"]


@pytest.mark.slow
def test_distmaml_train_on_a_ray_started_without_the_package(blobs, tmp_path):
    """A notebook that called ray.init() itself: the engine's actors carry the runtime environment instead."""
    import ray

    folder, mod, log = blobs
    ray.init(address="local", num_cpus=3, include_dashboard=False, logging_level="WARNING")
    try:
        sets = [s for s in SETS if not s.startswith(("model.name", "data.family"))]
        result = distmaml.train(model=mod.make, tasks=mod.Blobs, workers=2, overrides=[*sets, "meta.steps=4"])
        assert ray.is_initialized()  # the user's Ray is left running
    finally:
        ray.shutdown()
    assert result["workers"] == 2
    assert_shipped(worker_calls(log, {os.getpid()}), folder)
